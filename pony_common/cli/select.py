"""`ponyctl select`: a deterministic selection meeting a category mix, best scores first."""

from __future__ import annotations

import argparse
import json
import sys

from pony_common.config import Settings

DEFAULT_MIX_TEXT = "pony=0.10,furry=0.10,western=0.20,anime=0.25,realism=0.25,other=0.10"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="select a training set that meets a category mix")
    p.add_argument("--total", type=int, required=True, help="how many images")
    p.add_argument("--mix", default=DEFAULT_MIX_TEXT, help=f"CATEGORY=WEIGHT,... (default {DEFAULT_MIX_TEXT})")
    p.add_argument("--min-score", type=float, default=None, help="leave out images scored below this (0..1)")
    p.add_argument("--name", default="default", help="selection name (re-running replaces it)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.curation.selection import parse_mix, select_images

    report = select_images(settings, args.total, parse_mix(args.mix), min_score=args.min_score, name=args.name)
    sys.stdout.write((json.dumps(report.as_dict()) if args.json else report.table()) + "\n")
    return 0
