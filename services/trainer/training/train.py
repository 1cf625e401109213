"""Training entrypoint: `python -m services.trainer.training.train --spec FILE|env:NAME` (or under `torchrun`),
progress as JSON lines. `--spec env:PONY_TRAIN_SPEC` reads the spec YAML from that environment variable (training
Jobs).

Exit codes: 0 done (or stopped at --stop-after with a checkpoint), 2 bad spec/arguments, 1 training failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from pony_common.config import Settings
from pony_common.errors import InvalidArgument

if TYPE_CHECKING:
    from services.trainer.spec import TrainSpec

log = logging.getLogger(__name__)

ENV_PREFIX = "env:"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.trainer.training.train", description=__doc__)
    p.add_argument("--spec", required=True, help="training spec file (YAML or JSON), or env:NAME to read it from $NAME")
    p.add_argument("--run-id", default="", help="run id (names the output folder); default: the spec's name")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps, with a checkpoint")
    return p


def read_spec(ref: str, environ: Mapping[str, str]) -> TrainSpec:
    """The spec named by `--spec`: `env:NAME` parses the text in environment variable NAME, anything else is a file.
    Raises InvalidArgument("spec", ...) when the variable is unset or empty, or the file unreadable."""
    from services.trainer.spec import load_spec, parse_spec_text

    if ref.startswith(ENV_PREFIX):
        name = ref[len(ENV_PREFIX) :]
        text = environ.get(name, "") if name else ""
        if not text.strip():
            raise InvalidArgument("spec", f"environment variable {name or '(none)'} is unset or empty")
        return parse_spec_text(text)
    return load_spec(ref)


def dist_from_env(environ: Mapping[str, str]):  # -> DistInfo
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE (rank 0 of 1 without torchrun)."""
    from services.trainer.training.loop import DistInfo

    return DistInfo(
        rank=int(environ.get("RANK", "0")),
        local_rank=int(environ.get("LOCAL_RANK", "0")),
        world_size=int(environ.get("WORLD_SIZE", "1")),
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    settings = Settings.from_env(env)
    from pony_common.logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)  # logs go to stderr; stdout carries the events
    try:
        spec = read_spec(args.spec, env)
    except InvalidArgument as exc:
        sys.stderr.write(f"train: {exc}\n")
        return 2
    import torch.distributed as dist

    from services.trainer.training.loop import run_training

    info = dist_from_env(env)
    if "WORLD_SIZE" in env and not dist.is_initialized():
        backend = "gloo"
        if settings.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(info.local_rank)  # FSDP2's device mesh and NCCL use the current device
            # CPU tensors (FSDP2 CPU offload, DCP planning) go over gloo, CUDA tensors over NCCL.
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        run_training(spec, settings, run_id=args.run_id or spec.name, dist_info=info, stop_after=args.stop_after)
    except InvalidArgument as exc:
        sys.stderr.write(f"train: {exc}\n")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
