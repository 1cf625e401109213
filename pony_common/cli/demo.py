"""`ponyctl demo`: the whole loop on the embedded default (tiny models, local services, SQLite catalog)."""

from __future__ import annotations

import argparse

from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine with tiny models")
    p.add_argument("--workdir", default=None, help="state folder (default: PONY_STATE_DIR, ./.pony)")
    p.add_argument("--fresh", action="store_true", help="start from an empty state folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.demo import run_demo

    if args.workdir:
        settings = Settings.from_env(state_dir=args.workdir, **{k: "" for k in _STATE_FIELDS}).replace()
    return run_demo(settings, fresh=args.fresh)


_STATE_FIELDS = ("database_url", "broker_url", "result_backend", "blob_url", "models_dir", "triton_repo")
