"""`ponyctl models tiny DIR`: builds deterministic tiny models of the real architectures."""

from __future__ import annotations

import argparse
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model files")
    msub = p.add_subparsers(dest="models_command", required=True, parser_class=type(p))
    t = msub.add_parser("tiny", help="write tiny models (same classes, small configs) to DIR")
    t.add_argument("dir", nargs="?", default=None, help="target folder (default: PONY_MODELS_DIR)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_tiny)


def run_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.models.tiny import build_tiny_models

    out = Path(args.dir or settings.models_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    written = build_tiny_models(out, seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0
