"""How the transformer spreads over the ranks: DDP replicas, or PyTorch FSDP2 shards (`fully_shard` per transformer
block, then the root) with bf16 compute and fp32 master parameters, gradients and optimizer states."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from services.trainer.spec import TrainSpec


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The units FSDP shards one by one: AuraFlow's joint (MMDiT) blocks, then its single-stream blocks."""
    blocks: list[nn.Module] = []
    for name in ("joint_transformer_blocks", "single_transformer_blocks", "transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer block lists to shard")
    return blocks


def mixed_precision_policy(spec: TrainSpec) -> MixedPrecisionPolicy | None:
    """bf16 parameters in forward/backward, fp32 gradient reduction; the sharded master copies stay fp32.

    bf16 all-gathers and bf16 matmuls run on CPU/gloo too (slower than fp32 there, but numerically the same
    recipe as on GPUs), so CPU runs use the same policy."""
    if spec.mixed_precision != "bf16":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_fsdp(transformer: nn.Module, spec: TrainSpec) -> nn.Module:
    """Applies `fully_shard` to each transformer block, then the root, in place; returns the (same) module."""
    kwargs: dict[str, Any] = {"reshard_after_forward": spec.sharding.reshard_after_forward}
    policy = mixed_precision_policy(spec)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if spec.sharding.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(transformer):
        fully_shard(block, **kwargs)
    fully_shard(transformer, **kwargs)
    return transformer


def wrap(transformer: nn.Module, spec: TrainSpec, device: torch.device) -> nn.Module:
    """The module the training step calls: FSDP2-sharded, DDP-wrapped, or the transformer itself (one process)."""
    if spec.sharding.strategy == "fsdp":
        return shard_fsdp(transformer, spec)
    if distributed():
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(transformer, device_ids=ids)
    return transformer


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (all-gathered when it is a DTensor shard: every rank must call this)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded fp32 state dict on CPU; collective under FSDP (rank 0 gets it, the others an empty dict)."""
    if is_fsdp(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
