"""LoRA adapters inside the Triton model: the adapter set a request names (the `ADAPTERS` input, JSON), the batch key
that keeps requests with different sets apart, and an LRU cache of adapters loaded into one diffusers pipeline
(`AuraFlowPipeline` for V7, `StableDiffusionXLPipeline` for V6: both have diffusers' LoRA loader mixins).

An adapter is loaded once under a name derived from its registered name, version and sha256 (a re-registered file
is another adapter), after the sha256 of its file is checked against the registered one. A batch activates its set
with `set_adapters(names, weights)`; a batch without adapters (or whose adapters all weigh 0, which have no effect)
runs with the LoRA layers disabled, i.e. exactly the plain pipeline. Beyond `capacity` loaded adapters the least
recently used ones not in the current set are deleted (`delete_adapters`).

Imported by the Triton model (`triton_repo/<family>/1/model.py`); needs only torch/diffusers/peft and the stdlib."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file a diffusers LoRA folder holds (save_lora_weights)
DEFAULT_CAPACITY = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


class AdapterError(ValueError):
    """An adapter that cannot be applied (bad ADAPTERS input, missing file, sha256 mismatch)."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a request, as the sampler resolved it from the catalog."""

    name: str
    version: int
    uri: str  # the safetensors file or the folder holding `pytorch_lora_weights.safetensors`
    sha256: str  # of the file, as registered
    weight: float = 1.0
    lora_hash: str = ""  # A1111's short LoRA hash (PNG parameters); not sent to Triton

    @property
    def adapter_name(self) -> str:
        """The pipeline's name for it: name, version and sha256, so a re-registered file is another adapter."""
        return f"{_UNSAFE.sub('_', self.name)}_v{self.version}_{self.sha256[:12]}"

    def as_json(self) -> dict[str, Any]:
        """The `ADAPTERS` element: name, version, uri, sha256, weight."""
        out = asdict(self)
        out.pop("lora_hash")
        return out


def dump_adapters(adapters: Iterable[AdapterSpec]) -> str:
    """The `ADAPTERS` input: a JSON list of {name, version, uri, sha256, weight}."""
    return json.dumps([a.as_json() for a in adapters], separators=(",", ":"))


def parse_adapters(text: str | bytes | None) -> tuple[AdapterSpec, ...]:
    """The adapters of the `ADAPTERS` input; None/empty = none. AdapterError on a malformed list."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text or not text.strip():
        return ()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapters: not a JSON list: {exc}") from None
    if not isinstance(items, list):
        raise AdapterError("adapters: must be a JSON list")
    out = []
    for i, item in enumerate(items):
        try:
            spec = AdapterSpec(
                name=str(item["name"]),
                version=int(item["version"]),
                uri=str(item["uri"]),
                sha256=str(item["sha256"]).lower(),
                weight=float(item.get("weight", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"adapters[{i}]: needs name, version, uri, sha256, a numeric weight ({exc})") from None
        if not spec.name or not re.fullmatch(r"[0-9a-f]{64}", spec.sha256) or not math.isfinite(spec.weight):
            raise AdapterError(f"adapters[{i}]: needs a name, a sha256 (64 hex) and a finite weight")
        out.append(spec)
    return tuple(out)


def effective(adapters: Iterable[AdapterSpec]) -> tuple[AdapterSpec, ...]:
    """The adapters that change the image: a weight of 0 adds exactly nothing, so it is left out."""
    return tuple(a for a in adapters if a.weight != 0.0)


def batch_key(adapters: Iterable[AdapterSpec]) -> tuple[tuple[str, float], ...]:
    """What must be equal for two requests to share a pipeline batch: the effective adapters (names, versions and
    files via `adapter_name`) and their weights, in order."""
    return tuple((a.adapter_name, a.weight) for a in effective(adapters))


def weights_file(uri: str) -> str:
    """The safetensors file of an adapter uri: the file itself, or `<folder>/pytorch_lora_weights.safetensors`.
    A local path or `file://` URL; other fsspec URLs are returned as given (see `local_copy`)."""
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    if "://" in local:
        return uri if uri.endswith(".safetensors") else uri.rstrip("/") + "/" + LORA_FILE
    path = Path(local)
    return str(path / LORA_FILE) if path.is_dir() else str(path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy(spec: AdapterSpec, cache_dir: str | None = None) -> Path:
    """A local path of the adapter's file whose sha256 equals the registered one (a remote file is copied into
    `cache_dir`, keyed by sha256). AdapterError when the file is missing or its bytes changed."""
    source = weights_file(spec.uri)
    if "://" not in source:
        path = Path(source)
        if not path.is_file():
            raise AdapterError(f"adapter {spec.name} v{spec.version}: {LORA_FILE} or a .safetensors file not found")
    else:
        import fsspec

        folder = Path(cache_dir or tempfile.gettempdir()) / "pony-lora"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{spec.sha256}.safetensors"
        if not path.is_file():
            partial = path.with_suffix(f".{os.getpid()}.part")
            try:
                with fsspec.open(source, "rb") as src, partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except OSError as exc:
                partial.unlink(missing_ok=True)
                raise AdapterError(f"adapter {spec.name} v{spec.version}: cannot read {source}: {exc}") from None
            partial.replace(path)
    actual = file_sha256(path)
    if actual != spec.sha256:
        raise AdapterError(
            f"adapter {spec.name} v{spec.version}: the file's sha256 {actual[:12]} is not the registered "
            f"{spec.sha256[:12]} (the file changed after it was registered)"
        )
    return path


def _fused(pipe: Any) -> bool:
    """Whether the denoiser's attention runs fused QKV projections (the GPU fast path's `fuse_qkv`)."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    modules = getattr(denoiser, "modules", None)
    return bool(modules) and any(getattr(m, "fused_projections", False) for m in modules())


class AdapterCache:
    """Adapters loaded into `pipe`, most recently used last; `activate(adapters)` before each pipeline batch."""

    def __init__(self, pipe: Any, capacity: int = DEFAULT_CAPACITY, cache_dir: str | None = None) -> None:
        self.pipe = pipe
        self.capacity = max(1, int(capacity))
        self.cache_dir = cache_dir
        self.loaded: OrderedDict[str, AdapterSpec] = OrderedDict()
        self.active: tuple[tuple[str, float], ...] = ()
        self.loads = 0  # files loaded so far (a cache hit loads nothing)

    def activate(self, adapters: Sequence[AdapterSpec]) -> None:
        """Makes exactly `adapters` (at their weights) apply to the next pipeline call; none: the plain pipeline."""
        wanted = effective(adapters)
        key = batch_key(wanted)
        names = [a.adapter_name for a in wanted]
        if len(set(names)) != len(names):
            raise AdapterError("adapters: the same adapter twice in one request")
        for spec in wanted:
            self._ensure(spec)
        self._evict(keep=set(names))
        if key == self.active:
            return
        if not wanted:
            if self.loaded:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters(names, adapter_weights=[a.weight for a in wanted])
        self.active = key

    def _ensure(self, spec: AdapterSpec) -> None:
        name = spec.adapter_name
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        if _fused(self.pipe):
            raise AdapterError(
                "adapters: this model runs with fused QKV projections (PONY_SAMPLER_FUSE_QKV=true), which the "
                "LoRA layers (to_q/to_k/to_v) cannot attach to; serve LoRAs from an unfused model"
            )
        path = local_copy(spec, self.cache_dir)
        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        self.loaded[name] = spec
        self.loads += 1
        self.active = ("<changed>",)  # loading may change which adapters are active: set them again

    def _evict(self, keep: set[str]) -> None:
        while len(self.loaded) > self.capacity:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                return
            self.pipe.delete_adapters([victim])
            del self.loaded[victim]
            self.active = ("<changed>",)
        if not self.loaded and self.active:
            self.active = ()

    def evict(self, names: Iterable[str]) -> None:
        """Deletes these adapters now (e.g. ones removed from the registry) when they are loaded."""
        for name in names:
            if name in self.loaded:
                self.pipe.delete_adapters([name])
                del self.loaded[name]
                self.active = ("<changed>",)
