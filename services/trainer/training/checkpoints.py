"""Training checkpoints (transformer safetensors, EMA, optimizer, step, RNG state) with atomic writes and resume."""

from __future__ import annotations

import json
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.trainer.spec import FINAL_DIR

CHECKPOINTS_DIR = "checkpoints"
__all__ = ["FINAL_DIR", "Checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS_DIR / f"step-{step:08d}"


def list_checkpoints(output: Path) -> list[Checkpoint]:
    """Complete checkpoints (those with state.json), oldest first."""
    root = output / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        state = child / "state.json"
        if child.name.startswith("step-") and state.exists():
            found.append(Checkpoint(child, int(json.loads(state.read_text())["step"])))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output: Path) -> Checkpoint | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Writes a checkpoint folder under a temporary name, then renames it; prunes all but the newest `keep`."""
    target = checkpoint_dir(output, step)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "transformer.safetensors"))
    if ema_state is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return target


@dataclass
class LoadedCheckpoint:
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    ema_state: dict[str, torch.Tensor] | None
    rng: dict[str, Any]
    extra: dict[str, Any]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    state = json.loads((path / "state.json").read_text())
    ema_path = path / "ema.safetensors"
    return LoadedCheckpoint(
        step=int(state.pop("step")),
        model_state=load_file(str(path / "transformer.safetensors")),
        optimizer_state=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        ema_state=load_file(str(ema_path)) if ema_path.exists() else None,
        # Our own file: numpy's RNG state is not a tensor, so weights_only cannot read it.
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        extra=state,
    )
