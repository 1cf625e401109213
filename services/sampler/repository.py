"""The Triton model repository: one Triton model per served family (`<repo>/pony_v7`, `<repo>/pony_v6`), each
rendered from the one generic template (`triton_repo/pony`: config.pbtxt with the family's name and `family`
parameter, and the generic model.py), each with its own version folders."""

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
from services.sampler.families import kind_of, model_path
from services.sampler.sync_sibling import SIBLING_SOURCE, render_sibling_config, sibling_name

log = logging.getLogger(__name__)

# The default family (the one a repository created without a family is for).
MODEL_NAME = "pony_v7"
TEMPLATE_DIR = Path(__file__).with_name("triton_repo") / "pony"
MODEL_FILE = "model.py"
# A version folder names its weights here; version 1 may instead use the config's `pipeline_path`.
VERSION_FILE = "pipeline.json"
PIPELINE_MARKER = "model_index.json"
# Triton priority levels of every family model (config.pbtxt `priority_levels`): our 0..9 -> 10..1.
PRIORITY_LEVELS = 10
# A family's candidate model (`<family>_candidate`): a version loaded beside the serving one, reached only by requests
# that pin its number, until it is promoted into the family's model or discarded.
CANDIDATE_SUFFIX = "_candidate"
DISCARDED_FILE = "discarded.json"  # in the candidate model's folder: {version: reason}, numbers never served


@dataclass(frozen=True)
class RepoVersion:
    """A version folder and the pipeline it serves."""

    version: int
    uri: str
    # What the caller named (an s3:// URL, say) when `uri` is the local copy served.
    source: str = ""


def triton_priority(priority: int) -> int:
    """Our priority 0 (lowest) .. 9 (highest) as Triton's level (`priority_levels: 10`, 1 = served first)."""
    return PRIORITY_LEVELS - min(max(int(priority), 0), PRIORITY_LEVELS - 1)


def _quoted(value: object) -> str:
    """A protobuf text-format string literal (JSON escaping is a valid subset)."""
    return json.dumps(str(value))


def candidate_name(family: str) -> str:
    """The Triton model a family's candidate version is loaded in, beside the family's own model."""
    return f"{family}{CANDIDATE_SUFFIX}"


def render_config(settings: Settings, pipeline_path: str, family: str = MODEL_NAME, name: str = "") -> str:
    """config.pbtxt of `family` for `settings` (batching, device, limits, compile/warm-up) with `pipeline_path` as
    default; `name`: the Triton model's name when it is not the family's (its candidate model)."""
    template = string.Template((TEMPLATE_DIR / "config.pbtxt").read_text())
    on_gpu = settings.device.startswith("cuda")
    return template.substitute(
        name=_quoted(name or family),
        family=_quoted(family),
        max_batch_size=max(1, settings.sampler.max_batch_size),
        batch_delay_us=max(0, settings.sampler.batch_delay_us),
        default_priority_level=triton_priority(settings.sampler.default_priority),
        max_queue=max(0, settings.sampler.max_queue),
        instances=max(1, settings.sampler.instances),
        instance_kind="KIND_GPU" if on_gpu else "KIND_CPU",
        pipeline_path=_quoted(pipeline_path),
        device=_quoted("cuda" if on_gpu else "cpu"),
        dtype=_quoted(settings.dtype),
        compile=_quoted(str(settings.sampler.compile).lower()),
        compile_mode=_quoted(settings.sampler.compile_mode),
        compile_shapes=_quoted(settings.sampler.compile_shapes),
        fp8=_quoted(str(settings.sampler.fp8).lower()),
        fuse_qkv=_quoted(str(settings.sampler.fuse_qkv).lower()),
        preview_every=_quoted(max(1, settings.sampler.preview_every)),
        warmup=_quoted(settings.sampler.warmup),
        random_init=_quoted(settings.sampler.random_init),
        torch_threads=_quoted(0),
        max_width=_quoted(settings.sampler.max_width),
        max_height=_quoted(settings.sampler.max_height),
        max_steps=_quoted(settings.sampler.max_steps),
        max_images=_quoted(settings.sampler.max_images),
        max_batch_images=_quoted(max(settings.sampler.max_images, 2 * settings.sampler.max_batch_size)),
        adapter_cache=_quoted(max(1, settings.sampler.adapter_cache)),
    )


def _write_atomic(path: Path, text: str) -> None:
    """Replaces `path` whole, and only when the text changes (Triton reloads a model whose files changed)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ModelRepository:
    """One family's model in the repository: `<root>/<family>/config.pbtxt` and
    `<root>/<family>/<N>/{model.py, pipeline.json}`."""

    def __init__(self, root: str | Path, family: str = MODEL_NAME) -> None:
        self.root = Path(root)
        self.family = family
        self.model_dir = self.root / family

    def render(self, settings: Settings) -> None:
        """Writes the config and refreshes model.py in every version; creates version 1 (the family's configured
        model) when the repository has none."""
        default_uri = model_path(settings, self.family)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        config = render_config(settings, default_uri, self.family)
        _write_atomic(self.model_dir / "config.pbtxt", config)
        # The non-decoupled sibling (`<family>_sync`, plain KServe-v2 `infer`): two forwarders per family instance.
        sibling = self.root / sibling_name(self.family)
        (sibling / "1").mkdir(parents=True, exist_ok=True)
        _write_atomic(sibling / "config.pbtxt", render_sibling_config(config, 2 * max(1, settings.sampler.instances)))
        _write_atomic(sibling / "1" / MODEL_FILE, SIBLING_SOURCE.read_text())
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
        log.info(
            "triton repository rendered",
            extra={"repo": str(self.root), "model": self.family, "versions": len(versions)},
        )

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
        when it is not a diffusers pipeline folder of this family's pipeline class."""
        uri = uri.strip()
        if not uri:
            raise InvalidArgument("uri", f"must name a diffusers pipeline folder of {self.family}")
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
                self._check_class(uri, staging / "pipeline" / PIPELINE_MARKER)
            else:
                if not (Path(local) / PIPELINE_MARKER).is_file():
                    raise InvalidArgument("uri", f"{uri!r} is not a diffusers pipeline folder (no {PIPELINE_MARKER})")
                self._check_class(uri, Path(local) / PIPELINE_MARKER)
                served = str(Path(local).absolute())
            (staging / VERSION_FILE).write_text(json.dumps({"uri": served, "source": uri}))
            shutil.copyfile(TEMPLATE_DIR / "1" / MODEL_FILE, staging / MODEL_FILE)
            # The rename makes the folder appear whole: Triton never sees a half-written version.
            os.rename(staging, self.model_dir / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return RepoVersion(version, served, uri)

    def _check_class(self, uri: str, marker: Path) -> None:
        """A folder that names its pipeline class (model_index.json `_class_name`) names the family's, or
        InvalidArgument("uri"); one that names none is left to Triton's load."""
        want = kind_of(self.family).pipeline
        try:
            found = json.loads(marker.read_text()).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            found = ""
        if found and found != want:
            raise InvalidArgument("uri", f"{uri!r} is a {found} folder; {self.family} serves {want} folders")

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

    def take_version(self, other: ModelRepository, version: int) -> RepoVersion:
        """Moves `other`'s version folder here under the same number (a rename: weights fetched into it move too,
        nothing is copied); `version` must be newer than every folder here."""
        if version <= self.latest():
            raise ValueError(f"version {version} is not newer than version {self.latest()}")
        source_dir, target_dir = other.model_dir / str(version), self.model_dir / str(version)
        meta = json.loads((source_dir / VERSION_FILE).read_text())
        os.rename(source_dir, target_dir)
        uri = str(meta.get("uri", ""))
        if uri.startswith(str(source_dir) + os.sep):  # fetched weights moved with the folder
            uri = str(target_dir) + uri[len(str(source_dir)) :]
            _write_atomic(target_dir / VERSION_FILE, json.dumps({"uri": uri, "source": meta.get("source", uri)}))
        shutil.copyfile(TEMPLATE_DIR / "1" / MODEL_FILE, target_dir / MODEL_FILE)
        return RepoVersion(version, uri, str(meta.get("source", uri)))


class CandidateRepository(ModelRepository):
    """A family's candidate model in the repository: `<root>/<family>_candidate/config.pbtxt` (the family's config
    under the candidate's name, same `family` parameter and model.py) and at most one version folder, numbered
    after every version of the family; `discarded.json` keeps the numbers discarded (never served, never reused)."""

    def __init__(self, root: str | Path, family: str = MODEL_NAME) -> None:
        super().__init__(root, family)
        self.name = candidate_name(family)
        self.model_dir = self.root / self.name

    def render(self, settings: Settings) -> None:
        """Writes the config and refreshes model.py in the candidate's folder; creates no version."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        config = render_config(settings, model_path(settings, self.family), self.family, self.name)
        _write_atomic(self.model_dir / "config.pbtxt", config)
        source = (TEMPLATE_DIR / "1" / MODEL_FILE).read_text()
        for v in self.versions():
            _write_atomic(self.model_dir / str(v.version) / MODEL_FILE, source)

    def discarded(self) -> dict[int, str]:
        """The discarded version numbers and why."""
        path = self.model_dir / DISCARDED_FILE
        if not path.is_file():
            return {}
        return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}

    def mark_discarded(self, version: int, reason: str) -> None:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        found = {str(k): v for k, v in self.discarded().items()}
        found[str(version)] = reason
        _write_atomic(self.model_dir / DISCARDED_FILE, json.dumps(found, sort_keys=True))

    def highest(self) -> int:
        """The highest number this candidate model has held (loaded or discarded)."""
        return max([self.latest(), *self.discarded()], default=0)
