"""Generation parameters inside PNGs: A1111-style `parameters` text plus a `pony` JSON chunk; writer and reader; and
the short hashes A1111 writes (`Model hash`, `Lora hashes`).

A1111's text names the sampler as A1111 does (`Euler` with `Schedule type: Simple` for our flow-matching Euler),
`Model hash: <10 hex>` and `Lora hashes: "name: <12 hex>, ..."`, and repeats the hashes as Civitai's
`Hashes: {"model": ..., "lora:<name>": ...}` JSON, which parsers that split the text on commas (sd-parsers) read.

`Model hash` is A1111's short hash: the first 10 hex of the sha256 of the weights. For a single checkpoint file
that is the file's sha256, as in A1111. For a diffusers folder it is the sha256 of every weights file in it
(`*.safetensors`, `*.bin`, `*.pt`, `*.ckpt`), read one after the other in the order of their paths relative to the
folder (so any changed component changes it); `ModelHashes` computes it once per folder and caches it (in memory
and in a JSON file keyed by the folder's real path and its weight files' sizes and mtimes). A LoRA's hash is
A1111's (and kohya/AddNet's, Civitai's AutoV3): the sha256 of the file after its safetensors header, 12 hex."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

TEXT_KEY = "parameters"
JSON_KEY = "pony"
# A1111 field name -> our key, in the order A1111 writes them.
_FIELDS = (
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("Schedule type", "schedule_type"),
    ("CFG scale", "guidance"),
    ("Seed", "seed"),
    ("Size", "size"),
    ("Model hash", "model_hash"),
    ("Model", "model"),
    ("Model version", "model_version"),
    ("Lora hashes", "lora_hashes"),
    ("Hashes", "hashes"),
)
# Our sampler names -> (A1111's sampler, A1111's schedule type), for the A1111 text only (the JSON keeps ours).
A1111_SAMPLERS = {"Euler (flow matching)": ("Euler", "Simple")}
_OURS = {a1111: ours for ours, a1111 in A1111_SAMPLERS.items()}
MODEL_HASH_CHARS = 10  # A1111's short model hash
LORA_HASH_CHARS = 12  # A1111's `Lora hashes`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|\{[^{}]*\}|[^,]*)(?:,|$)')


def a1111_text(params: dict[str, Any]) -> str:
    """`prompt`, a `Negative prompt:` line when there is one, then `Steps: …, Seed: …, Size: WxH, …`."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    values = dict(params)
    if "width" in params and "height" in params:
        values["size"] = f"{params['width']}x{params['height']}"
    if values.get("sampler") in A1111_SAMPLERS and not values.get("schedule_type"):
        values["sampler"], values["schedule_type"] = A1111_SAMPLERS[values["sampler"]]
    adapters = [a for a in params.get("adapters") or [] if a.get("hash")]
    if adapters:
        values["lora_hashes"] = ", ".join(f"{a['name']}: {str(a['hash'])[:LORA_HASH_CHARS]}" for a in adapters)
    hashes = {f"lora:{a['name']}": str(a["hash"])[:LORA_HASH_CHARS] for a in adapters}
    if params.get("model_hash"):
        hashes = {"model": str(params["model_hash"])[:MODEL_HASH_CHARS], **hashes}
    values["hashes"] = hashes or None
    pairs = [f"{label}: {_a1111_value(values[key])}" for label, key in _FIELDS if values.get(key) not in (None, "")]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _a1111_value(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))  # `Hashes: {...}`, unquoted as A1111 extensions write it
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


def parse_a1111(text: str) -> dict[str, Any]:
    """The reverse of `a1111_text` (also reads other A1111 writers' fields, kept under their own labels)."""
    lines = text.strip("\n").split("\n")
    out: dict[str, Any] = {}
    last = lines[-1] if lines and re.match(r"^\s*Steps:", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt_lines, negative_lines, into_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            into_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if into_negative else prompt_lines).append(line)
    out["prompt"] = "\n".join(prompt_lines)
    out["negative_prompt"] = "\n".join(negative_lines)
    labels = dict(_FIELDS)
    for label, raw in _PAIR.findall(last):
        value: Any = raw.strip()
        if value.startswith('"') or value.startswith("{"):
            value = json.loads(value)
        key = labels.get(label.strip(), label.strip())
        if key == "lora_hashes":
            pairs = (item.partition(":") for item in str(value).split(","))
            value = {name.strip(): digest.strip() for name, _, digest in pairs if name.strip()}
        if key in ("steps", "seed"):
            value = int(value)
        elif key == "guidance":
            value = float(value)
        elif key == "size":
            w, _, h = value.partition("x")
            out["width"], out["height"] = int(w), int(h)
            continue
        out[key] = value
    if (out.get("sampler"), out.get("schedule_type")) in _OURS:
        out["sampler"] = _OURS[(out["sampler"], out.pop("schedule_type"))]
    return out


def encode_png(image: Image.Image | np.ndarray, params: dict[str, Any]) -> bytes:
    """A PNG of `image` carrying `params` as A1111 text (`parameters`) and as JSON (`pony`)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, a1111_text(params))
    info.add_text(JSON_KEY, json.dumps(params, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_parameters(source: bytes | str | Path) -> dict[str, Any]:
    """The parameters a PNG carries: the `pony` JSON when present, else parsed from the A1111 text.

    Raises ValueError when the file is not a PNG or carries no parameters."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise ValueError(f"not a PNG ({img.format})")
            text = dict(getattr(img, "text", {}) or {})
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"not a readable PNG: {exc}") from None
    if JSON_KEY in text:
        params = json.loads(text[JSON_KEY])
        params.setdefault(TEXT_KEY, text.get(TEXT_KEY, a1111_text(params)))
        return params
    if TEXT_KEY in text:
        params = parse_a1111(text[TEXT_KEY])
        params[TEXT_KEY] = text[TEXT_KEY]
        return params
    raise ValueError("the PNG carries no generation parameters")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def weights_sha256(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a diffusers folder's weight files read in path order (see the module)."""
    path = Path(path)
    files = [path] if path.is_file() else _weight_files(path)
    if not files:
        raise ValueError(f"{path}: no weight files")
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class ModelHashes:
    """A1111 short hashes of model folders, computed once each (thread-safe; a JSON cache file survives restarts
    and is trusted while the folder's weight files keep their sizes and mtimes)."""

    def __init__(self, cache_file: str | Path | None = None) -> None:
        self.cache_file = Path(cache_file) if cache_file else None
        self._lock = threading.Lock()
        self._memory: dict[str, tuple[list[Any], str]] = {}

    @staticmethod
    def _signature(path: Path) -> list[Any]:
        files = [path] if path.is_file() else _weight_files(path)
        return [[f.name if f == path else f.relative_to(path).as_posix(), *_stat(f)] for f in files]

    def _load(self) -> dict[str, Any]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            return dict(json.loads(self.cache_file.read_text()))
        except (OSError, ValueError):
            return {}

    def get(self, uri: str) -> str:
        """The 10-hex `Model hash` of a local checkpoint file or diffusers folder; "" when it is not local or has
        no weight files (a PNG then carries no `Model hash`)."""
        local = uri.removeprefix("file://")
        if "://" in local or not local:
            return ""
        path = Path(os.path.realpath(local))
        if not path.exists():
            return ""
        with self._lock:
            signature = self._signature(path)
            cached = self._memory.get(str(path))
            if cached is None:
                entry = self._load().get(str(path))
                cached = (entry["files"], entry["sha256"]) if isinstance(entry, dict) and "sha256" in entry else None
            if cached is not None and cached[0] == signature:
                self._memory[str(path)] = cached
                return cached[1][:MODEL_HASH_CHARS]
            try:
                full = weights_sha256(path)
            except (OSError, ValueError):
                return ""
            self._memory[str(path)] = (signature, full)
            if self.cache_file is not None:
                table = self._load()
                table[str(path)] = {"files": signature, "sha256": full}
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
                tmp.replace(self.cache_file)
            return full[:MODEL_HASH_CHARS]


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
