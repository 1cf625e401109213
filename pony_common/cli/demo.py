"""`ponyctl demo`: the whole loop on the embedded default (tiny models, local services, SQLite catalog, Triton)."""

from __future__ import annotations

import argparse
import os

from pony_common.cli.errors import UsageError
from pony_common.config import Settings

_STATE_FIELDS = ("database_url", "broker_url", "result_backend", "blob_url", "models_dir", "triton_repo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine with tiny models")
    p.add_argument("--workdir", default=None, help="state folder (default: PONY_STATE_DIR, ./.pony)")
    p.add_argument("--fresh", action="store_true", help="start from an empty state folder")
    p.add_argument("--free-ports", action="store_true", help="bind free ports instead of the DESIGN ports")
    p.add_argument("--per-category", type=int, default=9, help="sample images per content family")
    p.add_argument("--total", type=int, default=40, help="images to select for training")
    p.add_argument("--train-steps", type=int, default=4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.demo import DemoOptions, cli_exit

    if args.per_category < 1 or args.total < 1 or args.train_steps < 1:
        raise UsageError("--per-category, --total and --train-steps must be at least 1")
    if args.workdir:
        # A new state folder moves every state path that was not set explicitly with it.
        unset = {k: "" for k in _STATE_FIELDS if f"PONY_{k.upper()}" not in os.environ}
        settings = Settings.from_env(state_dir=args.workdir, **unset)
    options = DemoOptions(
        fresh=args.fresh,
        free_ports=args.free_ports,
        per_category=args.per_category,
        select_total=args.total,
        train_steps=args.train_steps,
    )
    return cli_exit(settings, options)
