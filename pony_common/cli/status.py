"""`ponyctl status`: the curation workflow's per-stage counts, failures with reasons, and throughput."""

from __future__ import annotations

import argparse
import json
import sys

from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="curation progress: per-stage counts, failures, throughput")
    p.add_argument("--failures", type=int, default=20, help="how many failures to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.curation.status import format_status, status_for

    status = status_for(settings, failures=max(0, args.failures))
    if args.json:
        sys.stdout.write(json.dumps(status.as_dict()) + "\n")
    else:
        sys.stdout.write(format_status(status) + "\n")
    return 0
