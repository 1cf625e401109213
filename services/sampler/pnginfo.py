"""Generation parameters inside PNGs: A1111-style `parameters` text plus a `pony` JSON chunk; writer and reader."""

from __future__ import annotations

import io
import json
import re
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
    ("CFG scale", "guidance"),
    ("Seed", "seed"),
    ("Size", "size"),
    ("Model", "model"),
    ("Model version", "model_version"),
)
_PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_text(params: dict[str, Any]) -> str:
    """`prompt`, a `Negative prompt:` line when there is one, then `Steps: …, Seed: …, Size: WxH, …`."""
    lines = [str(params.get("prompt", ""))]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    values = dict(params)
    if "width" in params and "height" in params:
        values["size"] = f"{params['width']}x{params['height']}"
    pairs = [f"{label}: {_a1111_value(values[key])}" for label, key in _FIELDS if values.get(key) not in (None, "")]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def _a1111_value(value: Any) -> str:
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
        if value.startswith('"'):
            value = json.loads(value)
        key = labels.get(label.strip(), label.strip())
        if key in ("steps", "seed"):
            value = int(value)
        elif key == "guidance":
            value = float(value)
        elif key == "size":
            w, _, h = value.partition("x")
            out["width"], out["height"] = int(w), int(h)
            continue
        out[key] = value
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
