"""`ponyctl ingest SOURCE`: store a folder/manifest/shards by content hash and curate each new image."""

from __future__ import annotations

import argparse
import json
import sys

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest images and send them through caption -> score/style/safety -> persist",
        description="SOURCE is a folder of images with .txt/.json sidecars, a .jsonl/.parquet manifest, "
        "or WebDataset .tar shards (a shard, a folder of shards, or a glob).",
    )
    p.add_argument("source")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="follow the images to the end")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    p.add_argument("--resume", action="store_true", help="also resend images of this source that did not finish")
    p.add_argument("--dup-distance", type=int, default=None, help="pHash bits within which images are near-duplicates")
    p.add_argument("--refit-styles", action="store_true", help="refit the style clusters on the whole pool")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.curation.duplicates import DEFAULT_MAX_DISTANCE
    from pony_common.curation.ingest import ingest_source

    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    distance = DEFAULT_MAX_DISTANCE if args.dup_distance is None else args.dup_distance
    if not 0 <= distance <= 32:
        raise UsageError("--dup-distance must be in 0..32")
    summary = ingest_source(
        settings,
        args.source,
        wait=args.wait,
        progress=not args.no_progress,
        timeout_s=args.timeout,
        resume=args.resume,
        max_distance=distance,
        refit_styles=args.refit_styles,
    )
    sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    for image in summary.failed:
        sys.stdout.write(f"failed {image.image_id[:12]} {image.uri}: {image.error}\n")
    for uri, reason in summary.unreadable.items():
        sys.stdout.write(f"unreadable {uri}: {reason}\n")
    if args.wait and summary.submitted:
        finished = sum(summary.finished.get(s, 0) for s in ("done", "failed"))
        if finished < len(summary.submitted):
            sys.stdout.write(f"{len(summary.submitted) - finished} images still in the workflow\n")
            return 1
    return 0
