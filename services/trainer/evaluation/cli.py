"""`ponyctl eval style-adherence`: evaluate a model version (+ LoRAs) on the style-adherence grid, print the cost
(images, seconds) and where the report is; through the trainer controller (EvaluateStyleAdherence), or `--local`
in this process. Exit 0: done; 1: `--compare-to` found regressions (named); 2: bad arguments."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from pony_common.cli.errors import UsageError, writable_folder
from pony_common.config import Settings
from pony_common.errors import InvalidArgument

MODEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
LORA_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})(?::(\d+))?(?:=(.+))?$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluations of model versions")
    esub = p.add_subparsers(dest="eval_command", required=True, parser_class=type(p))
    s = esub.add_parser(
        "style-adherence",
        help="generate the content x style x score-tag grid, judge it (style tagger, scorer), report locking",
    )
    s.add_argument("--model", type=_model, default="", help="model family (default: PONY_TRAINER_PUBLISH_MODEL)")
    s.add_argument("--version", type=_nonnegative_int, default=0, help="model version (default: the serving one)")
    s.add_argument(
        "--lora", action="append", type=_lora, default=[], metavar="NAME[:VERSION]=WEIGHT", help="apply a LoRA"
    )
    s.add_argument("--seeds", type=_nonnegative_int, default=0, help="seeds per cell (default: PONY_EVAL_SEEDS)")
    s.add_argument("--clusters", type=_nonnegative_int, default=0, help="style clusters (default: PONY_EVAL_CLUSTERS)")
    s.add_argument("--contents", default="", help="comma-separated content ids (default: all)")
    s.add_argument("--steps", type=_nonnegative_int, default=0, help="sampler steps (default: the family's)")
    s.add_argument("--size", type=_nonnegative_int, default=0, help="square image size (default: the family's)")
    s.add_argument("--out", default="", help="also write report.json, the Parquet tables and report.html here")
    s.add_argument("--compare-to", type=_nonnegative_int, default=0, metavar="VERSION", help="compare with a version")
    s.add_argument("--direct", action="store_true", help="blocking Generate calls instead of low-priority jobs")
    s.add_argument("--local", action="store_true", help="run here instead of on the trainer controller")
    s.set_defaults(func=run_style_adherence)


def _model(text: str) -> str:
    if text and not MODEL_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model family name (e.g. pony_v7)")
    return text


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _lora(text: str) -> tuple[str, int, float]:
    match = LORA_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME[:VERSION]=WEIGHT, e.g. style_fix=0.8")
    name, version, weight = match.group(1), int(match.group(2) or 0), match.group(3)
    try:
        value = 1.0 if weight is None else float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(value) or not -4.0 <= value <= 4.0:
        raise argparse.ArgumentTypeError(f"{text!r}: weight must be -4..4")
    return name, version, value


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _eval_request(args: argparse.Namespace):  # -> EvalRequest
    from services.trainer.evaluation.engine import EvalRequest
    from services.trainer.evaluation.results import Adapter

    request = EvalRequest(
        model=args.model,
        version=args.version,
        adapters=tuple(Adapter(name, weight, version) for name, version, weight in args.lora),
        seeds=args.seeds,
        clusters=args.clusters,
        contents=tuple(c.strip() for c in args.contents.split(",") if c.strip()),
        steps=args.steps,
        size=args.size,
        direct=args.direct,
        compare_to_version=args.compare_to,
    )
    try:
        request.check()
    except InvalidArgument as exc:
        raise UsageError(f"--{exc.field.split('[')[0].replace('_', '-')}: {exc.message}") from None
    return request


def run_style_adherence(args: argparse.Namespace, settings: Settings) -> int:
    request = _eval_request(args)
    out = writable_folder(Path(args.out), "give --out a folder you can write") if args.out else None
    if args.local:
        return _local(request, settings, out)
    return _remote(args, settings, out)


def _print(summary: dict, images: int, seconds: float, where: str, regressions: list[str]) -> int:
    version = summary.get("version")
    locked = ", ".join(summary.get("locked_contents") or []) or "none"
    _out(
        f"{summary.get('model')} v{'?' if version is None else version}: follow rate "
        f"{summary.get('follow_rate', 0):.3f}, locking {summary.get('locking', 0):.3f} "
        f"(max {summary.get('max_locking', 0):.3f}; locked: {locked}), "
        f"score-tag effect {summary.get('score_tag_delta', 0):+.3f}"
    )
    _out(f"cost: {images} images generated in {seconds:.1f} s ({seconds / max(images, 1):.2f} s per image)")
    _out(f"report: {where}")
    for line in regressions:
        _out(f"regression: {line}")
    return 1 if regressions else 0


def _write_out(out: Path, report, images: dict[str, bytes], comparison) -> Path:
    from services.trainer.evaluation.engine import Evaluator

    for name, data in Evaluator.files(report, images, comparison).items():
        (out / name).write_bytes(data)
    if comparison is not None:
        (out / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=2, sort_keys=True) + "\n")
    return out


def _local(request, settings: Settings, out: Path | None) -> int:
    from services.trainer.evaluation.engine import Evaluator

    def progress(item) -> None:
        if item.error:
            _out(f"{item.cell_id}: {item.error}")

    outcome = Evaluator(settings).run(request, on_image=progress)
    where = outcome.stored.html_uri or outcome.stored.json_uri
    if out is not None:
        where = str(_write_out(out, outcome.report, outcome.images, outcome.comparison))
    regressions = [r.message for r in outcome.comparison.regressions] if outcome.comparison else []
    report = outcome.report
    return _print(report.summary.to_dict(), report.cost.images, report.cost.seconds, where, regressions)


def _remote(args: argparse.Namespace, settings: Settings, out: Path | None) -> int:
    import grpc

    from pony.v1 import trainer_pb2
    from pony_common.errors import DependencyUnavailable, NotFound, PonyError
    from services.trainer.client import TrainerClient

    request = trainer_pb2.EvaluateStyleAdherenceRequest(
        model=args.model,
        version=args.version,
        adapters=[trainer_pb2.EvalAdapter(name=n, version=v, weight=w) for n, v, w in args.lora],
        seeds=args.seeds,
        clusters=args.clusters,
        contents=[c.strip() for c in args.contents.split(",") if c.strip()],
        steps=args.steps,
        size=args.size,
        compare_to_version=args.compare_to,
        direct=args.direct,
    )
    client = TrainerClient(settings)
    try:
        resp = client.stub.EvaluateStyleAdherence(request, timeout=24 * 3600)
        report_json = ""
        if out is not None:
            got = client.stub.GetEvaluation(
                trainer_pb2.GetEvaluationRequest(evaluation_id=resp.evaluation.evaluation_id, include_report=True)
            )
            report_json = got.report_json
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise UsageError(details) from None
        if code is grpc.StatusCode.NOT_FOUND:
            raise NotFound(details) from None
        if code is grpc.StatusCode.UNAVAILABLE:
            raise DependencyUnavailable(
                f"trainer controller unavailable: {details}; start it with `ponyctl serve trainer`, point "
                "PONY_TRAINER_ADDR at it, or evaluate here with --local"
            ) from None
        raise PonyError(f"{code.name}: {details}") from None
    ev = resp.evaluation
    where = ev.html_uri or ev.json_uri
    if out is not None and report_json:
        from services.trainer.evaluation.results import Comparison, Report

        comparison = Comparison.from_dict(json.loads(resp.comparison_json)) if resp.comparison_json else None
        where = str(_write_out(out, Report.from_dict(json.loads(report_json)), {}, comparison))
    summary = {
        "model": ev.model,
        "version": ev.version or None,
        "follow_rate": ev.follow_rate,
        "locking": ev.locking,
        "max_locking": ev.max_locking,
        "locked_contents": list(ev.locked_contents),
        "score_tag_delta": ev.score_tag_delta,
    }
    return _print(summary, ev.images, ev.seconds, where, list(resp.regressions))
