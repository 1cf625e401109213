"""The LoRA adapter registry, catalog side (table `adapters`, shared with the trainer, whose LoRA runs publish rows):
register (RegisterAdapter), remove (RemoveAdapter), list (ListModels), and resolve a request's adapter references
into what the Triton model loads (`services.sampler.lora.AdapterSpec`: name, version, uri, sha256, weight).

A version is one more than the newest of its name, removed ones included (RemoveAdapter only marks a row removed,
so a number never names two files). Requests name an adapter by name and version (0 = the newest not removed)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from pony_common.access import confine_model_uri, model_roots
from pony_common.catalog import Catalog
from pony_common.catalog.models import AdapterRow
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.sampler.generation import AdapterRequest
from services.sampler.lora import LORA_FILE, AdapterSpec, weights_file

MAX_WEIGHT = 4.0  # |weight| a request may give an adapter (A1111's UI goes to 2; beyond 4 images are noise)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # no `,` or `:`: A1111's `Lora hashes` text must parse
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is not a LoRA
# Key prefixes of a family's LoRA files (diffusers' layout, and kohya's for SDXL): a V6 LoRA is refused for V7.
FAMILY_PREFIXES = {
    "pony_v7": ("transformer.",),
    "pony_v6": ("unet.", "text_encoder.", "text_encoder_2.", "lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"),
}


@dataclass(frozen=True)
class Adapter:
    """A registered adapter version (a row of `adapters`)."""

    name: str
    version: int
    family: str
    uri: str
    sha256: str
    rank: int
    alpha: float
    run_id: str = ""
    tensor_sha256: str = ""
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class LoraFileInfo:
    """What registration reads from a LoRA safetensors file."""

    sha256: str  # of the whole file
    tensor_sha256: str  # of the bytes after the header (A1111's `Lora hashes`, Civitai's AutoV3)
    rank: int
    alpha: float
    prefixes: frozenset[str]  # the first component of its tensor names (`transformer`, `unet`, `lora_unet_...`)


def _adapter(row: AdapterRow) -> Adapter:
    return Adapter(
        name=row.name,
        version=row.version,
        family=row.family,
        uri=row.uri,
        sha256=row.sha256,
        rank=row.rank,
        alpha=row.alpha,
        run_id=row.run_id or "",
        tensor_sha256=row.tensor_sha256 or "",
        created_at=row.created_at,
    )


def _open(source: str) -> AbstractContextManager[IO[bytes]]:
    if "://" in source and not source.startswith("file://"):
        import fsspec

        return fsspec.open(source, "rb")  # type: ignore[no-any-return]
    return open(source.removeprefix("file://"), "rb")


def read_lora_file(source: str) -> LoraFileInfo:
    """Hashes and inspects a LoRA safetensors file (local path or fsspec URL). ValueError when it is not a
    safetensors file or holds no LoRA weights; OSError when it cannot be read."""
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with _open(source) as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER_BYTES:
            raise ValueError("not a safetensors file (its header length is implausible)")
        raw = f.read(size)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("not a safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError("not a safetensors file (its header is not a JSON object)")
        whole.update(head)
        whole.update(raw)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            whole.update(chunk)
            tensors.update(chunk)
    metadata = header.pop("__metadata__", None) or {}
    ranks = [
        int(info["shape"][0])
        for key, info in header.items()
        if (".lora_A." in key or ".lora_down." in key) and info.get("shape")
    ]
    if not ranks:
        raise ValueError("holds no LoRA weights (no lora_A / lora_down tensors)")
    rank = max(ranks)
    return LoraFileInfo(
        sha256=whole.hexdigest(),
        tensor_sha256=tensors.hexdigest(),
        rank=rank,
        alpha=_alpha(metadata, rank),
        prefixes=frozenset(key.split(".", 1)[0] + ("." if "." in key else "") for key in header),
    )


def _alpha(metadata: dict[str, Any], rank: int) -> float:
    """lora_alpha from diffusers' `lora_adapter_metadata` (or kohya's `ss_network_alpha`); else the rank (what
    diffusers uses for a file that does not say)."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        for key, value in packed.items():
            if key.endswith("lora_alpha") and isinstance(value, int | float):
                return float(value)
        if "ss_network_alpha" in metadata:
            return float(metadata["ss_network_alpha"])
    except (TypeError, ValueError, AttributeError):
        pass
    return float(rank)


def _fits(family: str, prefixes: Collection[str]) -> bool:
    wanted = FAMILY_PREFIXES.get(family)
    if wanted is None:
        return True
    return any(p.startswith(w) or (p + "_").startswith(w) for p in prefixes for w in wanted)


def check_name(name: str, field: str = "name") -> str:
    name = name.strip()
    if not NAME.fullmatch(name):
        raise InvalidArgument(field, "must be 1-64 letters, digits, `.`, `_` or `-`, starting with a letter or digit")
    return name


class AdapterRegistry:
    """Adapters in the catalog for the families `families()` names (default: the sampler settings' families)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        families: Callable[[], Collection[str]] | None = None,
        default_family: str | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self._families = families or (lambda: tuple(settings.sampler.families))
        self._default_family = default_family or settings.sampler.default_model.strip()

    @property
    def default_family(self) -> str:
        return self._default_family or next(iter(self._families()), "")

    @property
    def max_adapters(self) -> int:
        return self.settings.sampler.max_adapters

    # --- admin ---

    def register(self, name: str, uri: str, family: str = "") -> Adapter:
        """The next version of `name`: the LoRA file at `uri` (a `.safetensors` file or a folder holding
        `pytorch_lora_weights.safetensors`, under the model roots) for `family` (empty: the default family).
        Blocking (hashes the file)."""
        name = check_name(name)
        family = family.strip() or self.default_family
        served = self._families()
        if family not in served:
            raise InvalidArgument("family", f"must be a served family ({', '.join(sorted(served))}), got {family!r}")
        uri = confine_model_uri(self.settings, uri)
        location = model_roots(self.settings).confine(uri) or uri  # a local path as its real path
        source = weights_file(location)
        missing = f"names neither a .safetensors file nor a folder holding {LORA_FILE}"
        if ("://" not in source and not Path(source).is_file()) or not source.endswith(".safetensors"):
            raise InvalidArgument("uri", missing)
        try:
            info = read_lora_file(source)
        except ValueError as exc:
            raise InvalidArgument("uri", str(exc)) from None
        except OSError:
            raise InvalidArgument("uri", missing) from None
        if not _fits(family, info.prefixes):
            found = ", ".join(sorted(info.prefixes)[:3])
            raise InvalidArgument("family", f"the file's LoRA layers ({found}) are not {family}'s")
        for _ in range(5):
            try:
                with self.catalog.session() as s:
                    latest = s.scalar(select(func.max(AdapterRow.version)).where(AdapterRow.name == name))
                    row = AdapterRow(
                        name=name,
                        version=(latest or 0) + 1,
                        family=family,
                        base_model_version=None,
                        base_model_uri="",
                        uri=source,
                        sha256=info.sha256,
                        tensor_sha256=info.tensor_sha256,
                        rank=info.rank,
                        alpha=info.alpha,
                        run_id=None,
                    )
                    s.add(row)
                    s.flush()
                    return _adapter(row)
            except IntegrityError:
                continue  # another registration (or a trainer) took that version: look again
        raise RuntimeError(f"could not allocate a version of adapter {name}")

    def remove(self, name: str, version: int = 0) -> list[Adapter]:
        """Marks version `version` (0: every version) of `name` removed; the versions removed. InvalidArgument
        when there is nothing of that name (or version) to remove."""
        name = check_name(name)
        with self.catalog.session() as s:
            q = select(AdapterRow).where(AdapterRow.name == name, AdapterRow.removed_at.is_(None))
            if version:
                q = q.where(AdapterRow.version == version)
            rows = s.scalars(q.order_by(AdapterRow.version)).all()
            if not rows:
                field = "version" if version else "name"
                raise InvalidArgument(field, f"no adapter {name}" + (f" version {version}" if version else ""))
            now = dt.datetime.now(dt.UTC)
            s.execute(
                update(AdapterRow)
                .where(AdapterRow.name == name, AdapterRow.version.in_([r.version for r in rows]))
                .values(removed_at=now)
            )
            return [_adapter(r) for r in rows]

    def list(self, family: str | None = None) -> list[Adapter]:
        """Adapters not removed (of `family` when given), by name then version."""
        with self.catalog.session() as s:
            q = select(AdapterRow).where(AdapterRow.removed_at.is_(None))
            if family:
                q = q.where(AdapterRow.family == family)
            return [_adapter(r) for r in s.scalars(q.order_by(AdapterRow.name, AdapterRow.version))]

    # --- requests ---

    def resolve(self, refs: Sequence[AdapterRequest], family: str) -> tuple[AdapterSpec, ...]:
        """A request's adapters as the model loads them (versions resolved, weights filled), or InvalidArgument
        naming `adapters[i]…`. Blocking (one catalog read)."""
        if not refs:
            return ()
        if len(refs) > self.max_adapters:
            raise InvalidArgument("adapters", f"at most {self.max_adapters} adapters per request, got {len(refs)}")
        names: list[str] = []
        for i, ref in enumerate(refs):
            name = ref.name.strip()
            if not name:
                raise InvalidArgument(f"adapters[{i}].name", "must name a registered adapter")
            if name in names:
                raise InvalidArgument(f"adapters[{i}]", f"adapter {name} is named twice")
            names.append(name)
            weight = 1.0 if ref.weight is None else float(ref.weight)
            if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
                raise InvalidArgument(f"adapters[{i}].weight", f"must be a number in -{MAX_WEIGHT:g}..{MAX_WEIGHT:g}")
            if ref.version < 0:
                raise InvalidArgument(f"adapters[{i}].version", "must be a version number, or 0 for the newest")
        with self.catalog.session() as s:
            rows = s.scalars(
                select(AdapterRow).where(AdapterRow.name.in_(names), AdapterRow.removed_at.is_(None))
            ).all()
            by_name: dict[str, dict[int, AdapterRow]] = {}
            for row in rows:
                by_name.setdefault(row.name, {})[row.version] = row
            out = []
            for i, (name, ref) in enumerate(zip(names, refs, strict=True)):
                versions = by_name.get(name)
                if not versions:
                    raise InvalidArgument(f"adapters[{i}].name", f"no adapter named {name!r} is registered")
                row = versions.get(ref.version) if ref.version else versions[max(versions)]
                if row is None:
                    raise InvalidArgument(f"adapters[{i}].version", f"adapter {name} has no version {ref.version}")
                if row.family != family:
                    raise InvalidArgument(
                        f"adapters[{i}]", f"adapter {name} v{row.version} is for {row.family}, not {family}"
                    )
                if not row.tensor_sha256:
                    row.tensor_sha256 = self._tensor_sha256(row)
                out.append(
                    AdapterSpec(
                        name=row.name,
                        version=row.version,
                        uri=row.uri,
                        sha256=row.sha256,
                        weight=1.0 if ref.weight is None else float(ref.weight),
                        lora_hash=(row.tensor_sha256 or "")[:12],
                    )
                )
            return tuple(out)

    @staticmethod
    def _tensor_sha256(row: AdapterRow) -> str | None:
        """A trainer-published row's A1111 hash, computed once (None while its file cannot be read)."""
        try:
            info = read_lora_file(weights_file(row.uri))
        except (OSError, ValueError):
            return None
        return info.tensor_sha256 if info.sha256 == row.sha256 else None
