"""`ponyctl export DIR`: the training manifest (and WebDataset shards) of a selection."""

from __future__ import annotations

import argparse
import json
import sys

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write DIR/manifest.parquet (+ DIR/images, DIR/shards) for a selection")
    p.add_argument("dir")
    p.add_argument("--name", default="default", help="the selection to export")
    p.add_argument("--webdataset", action="store_true", help="also write WebDataset .tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.curation.export import export_selection

    if args.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    summary = export_selection(
        settings, args.dir, name=args.name, webdataset=args.webdataset, shard_size=args.shard_size
    )
    out = {"manifest": str(summary.manifest), "rows": summary.rows, "shards": [str(p) for p in summary.shards]}
    if summary.missing_style:
        out["missing_style_tags"] = summary.missing_style
    sys.stdout.write(json.dumps(out) + "\n")
    return 0
