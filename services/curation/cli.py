"""The curation tier's ponyctl verbs: ingest, status, select, export, report."""

from __future__ import annotations

import argparse
import json
import sys

from pony_common.cli.errors import UsageError
from pony_common.config import Settings
from pony_common.errors import InvalidArgument


def _usage(exc: InvalidArgument, flags: dict[str, str]) -> UsageError:
    """A domain error about an input as the command line names it (`mix` -> `--mix: ...`)."""
    flag = flags.get(exc.field)
    return UsageError(f"{flag}: {exc.message}" if flag else exc.message)


def register(sub: argparse._SubParsersAction) -> None:
    _register_ingest(sub)
    _register_status(sub)
    _register_select(sub)
    _register_export(sub)
    _register_report(sub)


def _register_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest images and send them through caption -> score/style/safety -> persist",
        description="SOURCE is a folder of images with .txt/.json sidecars, a .jsonl/.parquet manifest, "
        "or WebDataset .tar shards (a shard, a folder of shards, or a glob).",
    )
    p.add_argument("source", help="folder, .jsonl/.parquet manifest, or WebDataset shard(s)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="follow the images to the end")
    p.add_argument("--timeout", type=float, default=None, help="stop waiting after this many seconds")
    p.add_argument(
        "--resume",
        action="store_true",
        help="also retry images of this source that failed in a workflow stage (unfinished ones are always sent)",
    )
    p.add_argument("--dup-distance", type=int, default=None, help="pHash bits within which images are near-duplicates")
    p.add_argument("--refit-styles", action="store_true", help="refit the style clusters on the whole pool")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_ingest)


def _run_ingest(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.duplicates import DEFAULT_MAX_DISTANCE
    from services.curation.ingest import ingest_source

    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    distance = DEFAULT_MAX_DISTANCE if args.dup_distance is None else args.dup_distance
    if not 0 <= distance <= 32:
        raise UsageError("--dup-distance must be in 0..32")
    try:
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
    except InvalidArgument as exc:
        raise _usage(exc, {}) from None
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


def _register_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="curation progress: per-stage counts, failures, throughput")
    p.add_argument("--failures", type=int, default=20, help="how many failures to list")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.status import format_status, status_for

    status = status_for(settings, failures=max(0, args.failures))
    if args.json:
        sys.stdout.write(json.dumps(status.as_dict()) + "\n")
    else:
        sys.stdout.write(format_status(status) + "\n")
    return 0


DEFAULT_MIX_TEXT = "pony=0.10,furry=0.10,western=0.20,anime=0.25,realism=0.25,other=0.10"


def _register_select(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select", help="select a training set that meets a category mix")
    p.add_argument("--total", type=int, required=True, help="how many images")
    p.add_argument("--mix", default=DEFAULT_MIX_TEXT, help=f"CATEGORY=WEIGHT,... (default {DEFAULT_MIX_TEXT})")
    p.add_argument("--min-score", type=float, default=None, help="leave out images scored below this (0..1)")
    p.add_argument("--name", default="default", help="selection name (re-running replaces it)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_select)


def _run_select(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.selection import parse_mix, select_images

    try:
        report = select_images(settings, args.total, parse_mix(args.mix), min_score=args.min_score, name=args.name)
    except InvalidArgument as exc:
        raise _usage(exc, {"mix": "--mix", "total": "--total", "min_score": "--min-score"}) from None
    sys.stdout.write((json.dumps(report.as_dict()) if args.json else report.table()) + "\n")
    return 0


def _register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write DIR/manifest.parquet (+ DIR/images, DIR/shards) for a selection")
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--name", default="default", help="the selection to export")
    p.add_argument("--webdataset", action="store_true", help="also write WebDataset .tar shards")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.export import export_selection

    if args.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    try:
        summary = export_selection(
            settings, args.dir, name=args.name, webdataset=args.webdataset, shard_size=args.shard_size
        )
    except InvalidArgument as exc:
        raise UsageError(f"{exc.message}: run `ponyctl select --name {args.name}` first") from None
    out = {"manifest": str(summary.manifest), "rows": summary.rows, "shards": [str(p) for p in summary.shards]}
    if summary.missing_style:
        out["missing_style_tags"] = summary.missing_style
    if summary.skipped:
        out["skipped"] = summary.skipped
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def _register_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write DIR/index.html: thumbnails, captions, scores, styles, safety, histograms")
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--name", default="default", help="the selection to show")
    p.add_argument("--limit", type=int, default=1000, help="at most this many image cards")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.report import write_report

    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    try:
        path = write_report(settings, args.dir, selection=args.name, limit=args.limit)
    except InvalidArgument as exc:
        raise _usage(exc, {}) from None
    sys.stdout.write(f"{path}\n")
    return 0
