"""The trainer's ponyctl verbs: train submit|plan|get|list|cancel, and eval style-adherence (evaluation/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings
from pony_common.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    from services.trainer.evaluation.cli import register as register_eval

    _register_train(sub)
    register_eval(sub)  # `ponyctl eval style-adherence`


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training runs (TrainerController)")
    tsub = p.add_subparsers(dest="train_command", required=True, parser_class=type(p))
    s = tsub.add_parser("submit", help="validate a spec (YAML) and start a training run")
    s.add_argument("spec", help="training spec file (YAML or JSON)")
    s.add_argument("--run-id", default="", help="run id (default: <spec name>-<random>)")
    s.add_argument(
        "--local",
        action="store_true",
        help="run here with the local executor (no controller service) and wait for the end",
    )
    s.add_argument("--wait", action="store_true", help="(gRPC) follow the run until it ends")
    s.set_defaults(func=run_submit)
    pl = tsub.add_parser("plan", help="the per-GPU memory plan of a spec, and whether it fits the pool's GPUs")
    pl.add_argument("spec", help="training spec file (YAML or JSON)")
    pl.add_argument("--gpus", type=_positive_int, default=0, help="world size (default: nodes x processes_per_node)")
    pl.add_argument(
        "--gpu-memory-gib",
        type=_positive_float,
        default=0.0,
        help="memory of one GPU in GiB (default: PONY_TRAINER_GPU_MEMORY_GIB)",
    )
    pl.add_argument(
        "--base-model",
        default="",
        help="folder whose transformer/config.json to plan for (default: the spec's base_model, else built-in V7)",
    )
    pl.set_defaults(func=run_plan)
    g = tsub.add_parser("get", help="show a run")
    g.add_argument("run_id", help="the run's id (ponyctl train list)")
    g.set_defaults(func=run_get)
    ls = tsub.add_parser("list", help="list runs, newest first")
    ls.add_argument("--state", action="append", default=[], help="Pending|Running|Succeeded|Failed|Cancelled")
    ls.set_defaults(func=run_list)
    c = tsub.add_parser("cancel", help="cancel a pending or running run")
    c.add_argument("run_id", help="the run's id (ponyctl train list)")
    c.add_argument("--foreground", action="store_true", help="delete the Job with Foreground propagation")
    c.set_defaults(func=run_cancel)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{value:g} must be more than 0")
    return value


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _read_spec(path: str) -> str:
    from services.trainer.spec import parse_spec_text

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"spec file {path} does not exist")
    text = p.read_text()
    try:
        parse_spec_text(text)  # bad specs stop here with one line, before any server is contacted
    except InvalidArgument as exc:
        raise UsageError(f"invalid spec {path}: {exc}") from None
    return text


def _describe(run) -> str:  # run: services.trainer.store.Run
    loss = "" if run.last_loss is None else f" loss={run.last_loss:.4f}"
    version = "" if run.model_version is None else f" pony_v7=v{run.model_version}"
    return f"{run.id}\t{run.state}\tstep {run.step}/{run.total_steps}{loss}{version}\t{run.reason}"


def run_submit(args: argparse.Namespace, settings: Settings) -> int:
    text = _read_spec(args.spec)
    if args.local:
        return _submit_local(text, args.run_id, settings)
    return _submit_grpc(text, args, settings)


def run_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Prints the per-rank memory table; exit 0 when it fits one GPU (less the headroom), 1 when it does not."""
    from services.trainer.plan import plan_memory, refusal
    from services.trainer.spec import parse_spec_text

    text = _read_spec(args.spec)
    spec = parse_spec_text(text)
    if args.base_model and not (Path(args.base_model) / "transformer" / "config.json").is_file():
        raise UsageError(f"--base-model {args.base_model}: no transformer/config.json there")
    try:
        plan = plan_memory(spec, args.gpus or None, args.base_model)
    except InvalidArgument as exc:
        raise UsageError(f"invalid spec {args.spec}: {exc}") from None
    gib = args.gpu_memory_gib or settings.trainer.gpu_memory_gib
    headroom = settings.trainer.gpu_memory_headroom
    _out(plan.table())
    refused = refusal(plan, spec, gib, headroom)
    if refused is not None:
        _out(str(refused))
        return 1
    usable = gib * (1.0 - headroom)
    _out(f"fits: {plan.gpu_bytes / 2**30:.1f} GiB of {usable:.1f} GiB usable per GPU ({gib:g} GiB less {headroom:.0%})")
    return 0


def _submit_local(text: str, run_id: str, settings: Settings) -> int:
    from services.trainer.local_run import train_locally

    def show(run, event) -> None:
        if event.kind == "loss":
            _out(f"step {event.step}/{run.total_steps} loss {event.loss:.4f}")
        elif event.kind == "state":
            _out(f"state {event.state}: {event.message}")
        else:
            _out(event.message)

    try:
        run = train_locally(settings, text, run_id=run_id, on_event=show)
    except InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    _out(_describe(run))
    if run.checkpoint_uri:
        _out(f"checkpoint {run.checkpoint_uri}")
    return 0 if run.state == "Succeeded" else 1


def _rpc(call, *args, **kwargs):
    import grpc

    try:
        return call(*args, **kwargs)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise UsageError(exc.details()) from None  # type: ignore[attr-defined]
        from pony_common.errors import DependencyUnavailable, NotFound, PonyError

        if code is grpc.StatusCode.NOT_FOUND:
            raise NotFound(exc.details()) from None  # type: ignore[attr-defined]
        if code is grpc.StatusCode.UNAVAILABLE:
            raise DependencyUnavailable(
                f"trainer controller unavailable: {exc.details()}; start it with `ponyctl serve trainer`, "  # type: ignore[attr-defined]
                "point PONY_TRAINER_ADDR at it, or run a spec here with `ponyctl train submit SPEC --local`"
            ) from None
        raise PonyError(f"{code.name}: {exc.details()}") from None  # type: ignore[attr-defined]


def _pb_line(run) -> str:
    from pony.v1 import trainer_pb2

    state = trainer_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_").title()
    loss = f" loss={run.last_loss:.4f}" if run.HasField("last_loss") else ""
    version = f" pony_v7=v{run.model_version}" if run.HasField("model_version") else ""
    return f"{run.run_id}\t{state}\tstep {run.step}/{run.total_steps}{loss}{version}\t{run.reason}"


def _submit_grpc(text: str, args: argparse.Namespace, settings: Settings) -> int:
    from pony.v1 import trainer_pb2
    from services.trainer.client import TrainerClient

    client = TrainerClient(settings)
    resp = _rpc(client.submit_run, text, args.run_id)
    _out(_pb_line(resp.run))
    if not args.wait:
        return 0
    last = resp.run
    for item in client.watch_run(resp.run.run_id):
        last = item.run
        if item.HasField("event") and item.event.kind == trainer_pb2.RUN_EVENT_KIND_LOSS:
            _out(f"step {item.event.step}/{item.run.total_steps} loss {item.event.loss:.4f}")
    _out(_pb_line(last))
    return 0 if last.state == trainer_pb2.RUN_STATE_SUCCEEDED else 1


def run_get(args: argparse.Namespace, settings: Settings) -> int:
    from services.trainer.client import TrainerClient

    _out(_pb_line(_rpc(TrainerClient(settings).get_run, args.run_id).run))
    return 0


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    from pony.v1 import trainer_pb2
    from services.trainer.client import TrainerClient

    states = []
    for s in args.state:
        name = f"RUN_STATE_{s.upper()}"
        if name not in trainer_pb2.RunState.keys():  # noqa: SIM118 (an EnumTypeWrapper, not a dict)
            raise UsageError(f"--state {s}: use Pending, Running, Succeeded, Failed or Cancelled")
        states.append(trainer_pb2.RunState.Value(name))
    for run in _rpc(TrainerClient(settings).list_runs, states).runs:
        _out(_pb_line(run))
    return 0


def run_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from pony.v1 import trainer_pb2
    from services.trainer.client import TrainerClient

    propagation = (
        trainer_pb2.DELETE_PROPAGATION_FOREGROUND if args.foreground else trainer_pb2.DELETE_PROPAGATION_BACKGROUND
    )
    resp = _rpc(TrainerClient(settings).cancel_run, args.run_id, propagation)
    _out(_pb_line(resp.run))
    return 0
