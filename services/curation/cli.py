"""The curation tier's ponyctl verbs: ingest, status, select, export, report, dedup."""

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
    _register_dedup(sub)


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
    p = sub.add_parser(
        "export",
        help="write DIR/manifest.parquet, DIR/images (+ .txt captions, metadata.jsonl), trainer configs (+ shards)",
        description="Prompts follow the model family's convention and fit its text encoder's token budget; the "
        "token-length distribution is printed after the JSON summary.",
    )
    p.add_argument("dir", help="output folder (created if missing)")
    p.add_argument("--name", default="default", help="the selection to export")
    p.add_argument("--family", default="v7", choices=("v7", "v6"), help="model family of the prompt convention")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the family's from PONY_MODELS_DIR)")
    p.add_argument("--webdataset", action="store_true", help="also write WebDataset .tar shards (shuffled)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--shard-format", default="png", choices=("png", "jpg"), help="the one image key of the shards")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards' shuffled order")
    p.add_argument("--resolution", type=int, default=1024, help="training resolution in the dataloader configs")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.prompts.budget import format_token_stats
    from services.curation.export import export_selection

    if args.shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if args.resolution < 64:
        raise UsageError("--resolution must be at least 64")
    try:
        summary = export_selection(
            settings,
            args.dir,
            name=args.name,
            webdataset=args.webdataset,
            shard_size=args.shard_size,
            family=args.family,
            tokenizer=args.tokenizer,
            seed=args.seed,
            shard_format=args.shard_format,
            resolution=args.resolution,
        )
    except InvalidArgument as exc:
        if exc.field == "name":
            raise UsageError(f"{exc.message}: run `ponyctl select --name {args.name}` first") from None
        raise _usage(
            exc, {"tokenizer": "--tokenizer", "family": "--family", "shard_format": "--shard-format"}
        ) from None
    out = {
        "manifest": str(summary.manifest),
        "rows": summary.rows,
        "family": summary.family,
        "tokens": summary.tokens,
        "shards": [str(p) for p in summary.shards],
    }
    if summary.missing_style:
        out["missing_style_tags"] = summary.missing_style
    if summary.skipped:
        out["skipped"] = summary.skipped
    sys.stdout.write(json.dumps(out) + "\n")
    if summary.tokens is not None:
        sys.stdout.write(f"{summary.family} {format_token_stats(summary.tokens)}\n")
    else:
        sys.stdout.write(f"prompt tokens: {summary.tokenizer_note}\n")
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


def _register_dedup(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="group near-duplicates: new pHashes matched against the indexed ones (optionally by CLIP embedding too)",
        description="Matches the pHashes not yet indexed against each other and the indexed ones (groups only merge; "
        "--full recomputes every group, e.g. after changing --dup-distance). In each group the best-scored image stays "
        "eligible for selection.",
    )
    p.add_argument("--dup-distance", type=int, default=None, help="pHash bits within which images are near-duplicates")
    p.add_argument("--full", action="store_true", help="recompute every group from the stored pHashes")
    p.add_argument("--semantic", action="store_true", help="also group images whose stored CLIP embeddings are close")
    p.add_argument(
        "--threshold", type=float, default=None, help="cosine distance for --semantic, in (0, 1] (default 0.05)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_dedup)


def _run_dedup(args: argparse.Namespace, settings: Settings) -> int:
    from services.curation.duplicates import DEFAULT_MAX_DISTANCE, dedup_catalog

    distance = DEFAULT_MAX_DISTANCE if args.dup_distance is None else args.dup_distance
    if args.threshold is not None and not args.semantic:
        raise UsageError("--threshold needs --semantic")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise UsageError("--threshold must be in (0, 1]")
    try:
        summary = dedup_catalog(
            settings, max_distance=distance, full=args.full, semantic=args.semantic, threshold=args.threshold
        )
    except InvalidArgument as exc:
        raise _usage(exc, {"max_distance": "--dup-distance", "threshold": "--threshold"}) from None
    if args.json:
        sys.stdout.write(json.dumps(summary.as_dict()) + "\n")
    else:
        sys.stdout.write(
            " ".join(f"{k.replace('_', ' ')} {v}," for k, v in summary.as_dict().items()).rstrip(",") + "\n"
        )
    return 0
