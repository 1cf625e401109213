"""The Triton model repository of `pony_v7`: its config rendered from the template, one folder per version."""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pony_common.config import Settings
from pony_common.errors import InvalidArgument

log = logging.getLogger(__name__)

MODEL_NAME = "pony_v7"
TEMPLATE_DIR = Path(__file__).with_name("triton_repo") / MODEL_NAME
MODEL_FILE = "model.py"
# A version folder names its weights here; version 1 may instead use the config's `pipeline_path`.
VERSION_FILE = "pipeline.json"
PIPELINE_MARKER = "model_index.json"


@dataclass(frozen=True)
class RepoVersion:
    """A version folder and the pipeline it serves."""

    version: int
    uri: str
    # What the caller named (an s3:// URL, say) when `uri` is the local copy served.
    source: str = ""


def _quoted(value: object) -> str:
    """A protobuf text-format string literal (JSON escaping is a valid subset)."""
    return json.dumps(str(value))


def render_config(settings: Settings, pipeline_path: str) -> str:
    """config.pbtxt for `settings` (batching, device, limits, compile/warm-up) with `pipeline_path` as default."""
    template = string.Template((TEMPLATE_DIR / "config.pbtxt").read_text())
    on_gpu = settings.device.startswith("cuda")
    return template.substitute(
        max_batch_size=max(1, settings.sampler.max_batch_size),
        batch_delay_us=max(0, settings.sampler.batch_delay_us),
        instance_kind="KIND_GPU" if on_gpu else "KIND_CPU",
        pipeline_path=_quoted(pipeline_path),
        device=_quoted("cuda" if on_gpu else "cpu"),
        dtype=_quoted(settings.dtype),
        compile=_quoted(str(settings.sampler.compile).lower()),
        warmup=_quoted(settings.sampler.warmup),
        random_init=_quoted(settings.sampler.random_init),
        torch_threads=_quoted(0),
        max_width=_quoted(settings.sampler.max_width),
        max_height=_quoted(settings.sampler.max_height),
        max_steps=_quoted(settings.sampler.max_steps),
        max_images=_quoted(settings.sampler.max_images),
        max_batch_images=_quoted(max(settings.sampler.max_images, 2 * settings.sampler.max_batch_size)),
    )


def _write_atomic(path: Path, text: str) -> None:
    """Replaces `path` whole, and only when the text changes (Triton reloads a model whose files changed)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ModelRepository:
    """`<root>/pony_v7/config.pbtxt` and `<root>/pony_v7/<N>/{model.py, pipeline.json}`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.model_dir = self.root / MODEL_NAME

    def render(self, settings: Settings) -> None:
        """Writes the config and refreshes model.py in every version; creates version 1 (the configured
        sampler model) when the repository has none."""
        default_uri = settings.model_path("sampler")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.model_dir / "config.pbtxt", render_config(settings, default_uri))
        source = (TEMPLATE_DIR / "1" / MODEL_FILE).read_text()
        versions = self.versions()
        if not versions:
            first = self.model_dir / "1"
            first.mkdir(exist_ok=True)
            (first / VERSION_FILE).write_text(json.dumps({"uri": default_uri, "source": default_uri}))
            versions = self.versions()
        for v in versions:
            target = self.model_dir / str(v.version) / MODEL_FILE
            _write_atomic(target, source)
        log.info("triton repository rendered", extra={"repo": str(self.root), "versions": len(versions)})

    def versions(self) -> list[RepoVersion]:
        """The version folders, oldest first."""
        if not self.model_dir.is_dir():
            return []
        found = []
        for entry in self.model_dir.iterdir():
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0:
                meta = entry / VERSION_FILE
                info = json.loads(meta.read_text()) if meta.exists() else {}
                uri = info.get("uri", "")
                found.append(RepoVersion(int(entry.name), uri, info.get("source", uri)))
        return sorted(found, key=lambda v: v.version)

    def latest(self) -> int:
        versions = self.versions()
        return versions[-1].version if versions else 0

    def add_version(self, uri: str, version: int | None = None) -> RepoVersion:
        """Writes version N+1 (or `version`, which must be newer than every folder) serving the pipeline at
        `uri`: a local folder, or an fsspec URL copied into the version folder. Raises InvalidArgument("uri")
        when it is not a diffusers pipeline folder."""
        uri = uri.strip()
        if not uri:
            raise InvalidArgument("uri", "must name a diffusers AuraFlowPipeline folder")
        latest = self.latest()
        version = latest + 1 if version is None else version
        if version <= latest:
            raise ValueError(f"version {version} is not newer than version {latest}")
        self.model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=self.model_dir))
        try:
            local = uri[len("file://") :] if uri.lower().startswith("file://") else uri  # a scheme has no case
            if "://" in local:
                served = self._fetch(uri, staging / "pipeline", version)
            else:
                if not (Path(local) / PIPELINE_MARKER).is_file():
                    raise InvalidArgument("uri", f"{uri!r} is not a diffusers pipeline folder (no {PIPELINE_MARKER})")
                served = str(Path(local).absolute())
            (staging / VERSION_FILE).write_text(json.dumps({"uri": served, "source": uri}))
            shutil.copyfile(TEMPLATE_DIR / "1" / MODEL_FILE, staging / MODEL_FILE)
            # The rename makes the folder appear whole: Triton never sees a half-written version.
            os.rename(staging, self.model_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return RepoVersion(version, served, uri)

    def _fetch(self, uri: str, target: Path, version: int) -> str:
        import fsspec

        # A web server's redirect could lead off the allowed prefix: http(s) fetches follow none.
        options = {"allow_redirects": False} if uri.lower().startswith(("http://", "https://")) else {}
        fs, path = fsspec.core.url_to_fs(uri, **options)
        if not fs.exists(f"{path.rstrip('/')}/{PIPELINE_MARKER}"):
            raise InvalidArgument("uri", f"{uri!r} is not a diffusers pipeline folder (no {PIPELINE_MARKER})")
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
        final = self.model_dir / str(version) / "pipeline"
        return str(final)

    def remove_version(self, version: int) -> None:
        """Drops a version folder (a version that failed to load, so `latest` points back to a good one)."""
        shutil.rmtree(self.model_dir / str(version), ignore_errors=True)
