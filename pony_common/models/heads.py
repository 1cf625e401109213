"""MLP heads on CLIP image embeddings in LAION's improved-aesthetic-predictor layout, with their calibration."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LAION_HIDDEN: tuple[int, ...] = (1024, 128, 64, 16)
HEAD_WEIGHTS = "head.safetensors"
HEAD_INFO = "head.json"
HEAD_FORMAT = "pony-mlp-head/1"
NSFW_LABELS: tuple[str, ...] = ("safe", "questionable", "explicit")
_LINEAR_INDEXES = (0, 2, 4, 6, 7)


class MLPHead(nn.Module):
    """LAION's MLP: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear.

    No activations (LAION's "linear" variant); state-dict keys are `layers.{0,2,4,6,7}.{weight,bias}`.
    """

    def __init__(self, in_features: int, out_features: int = 1, hidden: Sequence[int] = LAION_HIDDEN) -> None:
        super().__init__()
        if len(hidden) != 4:
            raise ValueError(f"hidden must have 4 widths (LAION layout), got {list(hidden)}")
        h0, h1, h2, h3 = (int(h) for h in hidden)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.hidden = (h0, h1, h2, h3)
        self.layers = nn.Sequential(
            nn.Linear(self.in_features, h0),
            nn.Dropout(0.2),
            nn.Linear(h0, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.1),
            nn.Linear(h2, h3),
            nn.Linear(h3, self.out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@dataclass(frozen=True)
class Calibration:
    """Maps a raw head output to [0, 1]: affine `(raw - lo) / (hi - lo)` or a percentile table, clamped."""

    kind: str = "affine"
    lo: float = 1.0
    hi: float = 10.0
    raw: tuple[float, ...] = ()
    score: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "affine":
            if not self.hi > self.lo:
                raise ValueError(f"affine calibration needs hi > lo, got lo={self.lo} hi={self.hi}")
        elif self.kind == "percentile":
            if len(self.raw) < 2 or len(self.raw) != len(self.score):
                raise ValueError("percentile calibration needs >= 2 raw points and as many scores")
            if any(b <= a for a, b in pairwise(self.raw)):
                raise ValueError("percentile calibration raw points must be strictly increasing")
            if any(b < a for a, b in pairwise(self.score)):
                raise ValueError("percentile calibration scores must be non-decreasing")
        else:
            raise ValueError(f"unknown calibration kind {self.kind!r} (affine or percentile)")

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.to(torch.float32)
        if self.kind == "affine":
            return ((raw - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0)
        xs = torch.tensor(self.raw, dtype=torch.float32, device=raw.device)
        ys = torch.tensor(self.score, dtype=torch.float32, device=raw.device)
        idx = torch.searchsorted(xs, raw.contiguous()).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
        t = ((raw - x0) / (x1 - x0)).clamp(0.0, 1.0)
        return (y0 + t * (y1 - y0)).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "affine":
            return {"type": "affine", "lo": self.lo, "hi": self.hi}
        return {"type": "percentile", "raw": list(self.raw), "score": list(self.score)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        kind = data.get("type", "affine")
        if kind == "affine":
            return cls("affine", lo=float(data.get("lo", 1.0)), hi=float(data.get("hi", 10.0)))
        return cls(
            "percentile",
            raw=tuple(float(v) for v in data["raw"]),
            score=tuple(float(v) for v in data["score"]),
        )

    @classmethod
    def from_samples(cls, raw: torch.Tensor, points: int = 21) -> Calibration:
        """A percentile table from observed raw outputs: score q at the q-quantile of `raw`."""
        qs = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
        values = torch.quantile(raw.detach().to(torch.float64).flatten(), qs).tolist()
        xs: list[float] = []
        for v in values:
            v = float(f"{v:.8g}")
            if xs and v <= xs[-1]:
                v = math.nextafter(xs[-1], math.inf)
            xs.append(v)
        return cls("percentile", raw=tuple(xs), score=tuple(round(float(q), 6) for q in qs))


@dataclass(frozen=True)
class HeadInfo:
    """What a head is for and how to read its output; stored as `head.json` next to `head.safetensors`."""

    kind: str
    in_features: int
    out_features: int = 1
    hidden: tuple[int, ...] = LAION_HIDDEN
    labels: tuple[str, ...] = ()
    calibration: Calibration | None = None
    embedding_model: str = ""
    version: str = field(default="", compare=False)

    def calibrate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> [0, 1] with the stored calibration (LAION's 1..10 affine when none is stored)."""
        return (self.calibration or Calibration())(raw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HEAD_FORMAT,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "hidden": list(self.hidden),
            "labels": list(self.labels),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "embedding_model": self.embedding_model,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: str = "") -> HeadInfo:
        calibration = data.get("calibration")
        return cls(
            kind=str(data["kind"]),
            in_features=int(data["in_features"]),
            out_features=int(data.get("out_features", 1)),
            hidden=tuple(int(h) for h in data.get("hidden", LAION_HIDDEN)),
            labels=tuple(str(x) for x in data.get("labels", ())),
            calibration=Calibration.from_dict(calibration) if calibration else None,
            embedding_model=str(data.get("embedding_model", "")),
            version=version,
        )


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def _shapes_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[int, int, tuple[int, ...]]:
    missing = [f"layers.{i}.{p}" for i in _LINEAR_INDEXES for p in ("weight", "bias")]
    missing = [k for k in missing if k not in state]
    if missing:
        raise ValueError(f"not a LAION-layout MLP head: missing {missing}")
    in_features = state["layers.0.weight"].shape[1]
    hidden = tuple(state[f"layers.{i}.weight"].shape[0] for i in _LINEAR_INDEXES[:4])
    out_features = state["layers.7.weight"].shape[0]
    return in_features, out_features, hidden


def save_head(directory: str | Path, head: MLPHead, info: HeadInfo) -> Path:
    """Write `head.safetensors` + `head.json` (sorted keys, stable bytes) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
    text = json.dumps(info.to_dict(), indent=2, sort_keys=True) + "\n"
    (directory / HEAD_INFO).write_text(text, encoding="utf-8")
    return directory


def load_head(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[MLPHead, HeadInfo]:
    """Load our `head.safetensors` + `head.json` folder, or a LAION `.pth` state dict (an aesthetic head).

    The head comes back in eval mode; `HeadInfo.version` is a short hash of the weights file.
    """
    path = Path(path)
    if path.is_dir():
        weights = path / HEAD_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"no {HEAD_WEIGHTS} in {path}")
        state = load_file(str(weights), device="cpu")
        info_file = path / HEAD_INFO
        info_data = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else None
    elif path.is_file():
        weights = path
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
        info_file = path.with_name(HEAD_INFO)
        info_data = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else None
    else:
        raise FileNotFoundError(f"no head at {path}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    in_features, out_features, hidden = _shapes_from_state_dict(state)
    version = _file_digest(weights)
    if info_data is None:
        # A bare LAION checkpoint: an aesthetic head on the AVA 1..10 scale.
        info = HeadInfo(
            kind="aesthetic",
            in_features=in_features,
            out_features=out_features,
            hidden=hidden,
            calibration=Calibration(),
            version=version,
        )
    else:
        info = HeadInfo.from_dict(info_data, version=version)
        if (info.in_features, info.out_features, info.hidden) != (in_features, out_features, hidden):
            raise ValueError(
                f"{info_file}: shapes {info.in_features}/{list(info.hidden)}/{info.out_features} "
                f"disagree with the weights {in_features}/{list(hidden)}/{out_features}"
            )
    head = MLPHead(in_features, out_features, hidden)
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return head.to(map_location).eval(), info
