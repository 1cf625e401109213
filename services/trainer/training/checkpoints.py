"""Training checkpoints (transformer safetensors, EMA, optimizer, step, RNG state) with atomic writes and resume;
sharded FSDP2 checkpoints through torch.distributed.checkpoint (DCP) in the same folder layout."""

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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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


# --- sharded (FSDP2) checkpoints: torch.distributed.checkpoint, one folder written by every rank ---

SHARDED_FORMAT = "dcp"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_sharded_checkpoint(
    output: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    extra: dict[str, Any],
    keep: int,
    rank: int,
) -> Path:
    """Every rank writes its shards of the model, optimizer and EMA (DCP) and its RNG state into a temporary folder
    shared by all ranks; rank 0 then writes state.json and renames it (collective: every rank calls this)."""
    target = checkpoint_dir(output, step)
    tmp = target.parent / f".tmp-{target.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if ema_state is not None:
        state["ema"] = ema_state
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / _rng_file(rank))
    _barrier()
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps({"step": step, "format": SHARDED_FORMAT, **extra}, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        for old in list_checkpoints(output)[:-keep]:
            shutil.rmtree(old.path, ignore_errors=True)
    _barrier()
    return target


def is_sharded(path: Path) -> bool:
    return json.loads((path / "state.json").read_text()).get("format") == SHARDED_FORMAT


def load_sharded_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    rank: int,
) -> int:
    """Loads a sharded checkpoint in place (model, optimizer, EMA shadows, this rank's RNG); returns its step.
    Collective: every rank calls it. DCP reshards, so the world size may differ from the saving run's (the RNG
    state is then the saved rank 0's for new ranks)."""
    meta = json.loads((path / "state.json").read_text())
    model_state, optim_state = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if ema_state is not None:
        state["ema"] = ema_state
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / _rng_file(rank)
    if not rng.exists():
        rng = path / _rng_file(0)
    set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))  # our own file (numpy state)
    return int(meta["step"])
