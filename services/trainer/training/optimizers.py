"""The optimizer a spec names: torch AdamW (fp32 states) or bitsandbytes' AdamW8bit (8-bit blockwise states)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pony_common.errors import InvalidArgument
from services.trainer.spec import OptimizerSpec


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW with the spec's hyper-parameters; `adamw8bit` keeps its two moments in 8 bits (bitsandbytes, which
    steps on CPU as well as CUDA; parameters under 4096 elements keep fp32 states, as bitsandbytes decides)."""
    kwargs = {
        "lr": spec.learning_rate,
        "betas": (spec.beta1, spec.beta2),
        "eps": spec.eps,
        "weight_decay": spec.weight_decay,
    }
    params = list(params)
    if spec.kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InvalidArgument("spec.optimizer.kind", "adamw8bit needs bitsandbytes, not installed here") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
