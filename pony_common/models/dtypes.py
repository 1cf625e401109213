"""`PONY_DTYPE` names -> torch dtypes, one table for every service."""

from __future__ import annotations

import torch

from pony_common.config import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def torch_dtype(name: str) -> torch.dtype:
    """`float32`, `float16`/`fp16`/`half`, `bfloat16`/`bf16` -> the torch dtype; ConfigError (a ValueError) else."""
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"PONY_DTYPE={name!r} is not one of {', '.join(sorted(DTYPES))}") from None
