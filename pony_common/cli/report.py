"""`ponyctl report DIR`: a self-contained HTML page of the curated pool (open DIR/index.html in a browser)."""

from __future__ import annotations

import argparse
import sys

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write DIR/index.html: thumbnails, captions, scores, styles, safety, histograms")
    p.add_argument("dir")
    p.add_argument("--name", default="default", help="the selection to show")
    p.add_argument("--limit", type=int, default=1000, help="at most this many image cards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.curation.report import write_report

    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    path = write_report(settings, args.dir, selection=args.name, limit=args.limit)
    sys.stdout.write(f"{path}\n")
    return 0
