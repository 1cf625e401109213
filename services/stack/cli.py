"""The platform-wide ponyctl verbs: serve <service>, demo, models tiny|triton-repo."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from pony_common.cli.errors import UsageError, writable_folder
from pony_common.config import Settings
from services.stack.registry import SERVICE_MODULES, canonical, create_service


def register(sub: argparse._SubParsersAction) -> None:
    _register_serve(sub)
    _register_demo(sub)
    _register_models(sub)


def _register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a gRPC service")
    p.add_argument("service", help=f"one of: {', '.join(SERVICE_MODULES)}")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: the service's DESIGN port)")
    p.set_defaults(func=_run_serve, logs="stderr")  # JSON lines on stderr: the log a collector reads


def _run_serve(args: argparse.Namespace, settings: Settings) -> int:
    try:
        name = canonical(args.service)
    except KeyError:
        raise UsageError(f"unknown service {args.service!r}; choose one of: {', '.join(SERVICE_MODULES)}") from None
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    from pony_common.grpc.server import serve_forever
    from pony_common.metrics import start_metrics_server
    from pony_common.tracing import setup_tracing

    if args.port is not None:
        key = name.replace("-", "_")
        settings = settings.replace(**{f"{key}_addr": f"{settings.bind_host}:{args.port}"})
    start_metrics_server(settings.metrics_port)
    setup_tracing(settings, service_name=f"pony-{name}")
    asyncio.run(serve_forever(settings, [create_service(name, settings)]))
    return 0


_STATE_FIELDS = ("database_url", "broker_url", "result_backend", "blob_url", "models_dir", "triton_repo")


def _register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole loop on this machine with tiny models")
    p.add_argument("--workdir", default=None, help="state folder (default: PONY_STATE_DIR, ./.pony)")
    p.add_argument("--fresh", action="store_true", help="start from an empty state folder")
    p.add_argument("--free-ports", action="store_true", help="bind free ports instead of the DESIGN ports")
    p.add_argument("--per-category", type=int, default=9, help="sample images per content family")
    p.add_argument("--total", type=int, default=40, help="images to select for training")
    p.add_argument("--train-steps", type=int, default=4, help="training steps of the demo run")
    p.set_defaults(func=_run_demo, logs="terminal")  # the demo writes its own log file (demo.log)


def _run_demo(args: argparse.Namespace, settings: Settings) -> int:
    from services.stack.demo import DemoOptions, cli_exit

    if args.per_category < 1 or args.total < 1 or args.train_steps < 1:
        raise UsageError("--per-category, --total and --train-steps must be at least 1")
    if args.workdir:
        # A new state folder moves every state path that was not set explicitly with it.
        unset = {k: "" for k in _STATE_FIELDS if f"PONY_{k.upper()}" not in os.environ}
        settings = Settings.from_env(state_dir=args.workdir, **unset)
    options = DemoOptions(
        fresh=args.fresh,
        free_ports=args.free_ports,
        per_category=args.per_category,
        select_total=args.total,
        train_steps=args.train_steps,
    )
    return cli_exit(settings, options)


def _register_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model files")
    msub = p.add_subparsers(dest="models_command", required=True, parser_class=type(p))
    t = msub.add_parser("tiny", help="write tiny models (same classes, small configs) to DIR")
    t.add_argument("dir", nargs="?", default=None, help="target folder (default: PONY_MODELS_DIR)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_tiny)
    r = msub.add_parser(
        "triton-repo",
        help="render the Triton model repository of pony_v7 (config.pbtxt, version 1) into DIR",
        description="Writes DIR/pony_v7/config.pbtxt from the settings (PONY_SAMPLER_*, PONY_DEVICE, PONY_DTYPE) "
        "and, when DIR holds no version yet, version 1 serving --model. Existing versions are kept. "
        "The sampler renders the same files at start; this command lets them exist before Triton starts.",
    )
    r.add_argument("dir", nargs="?", default=None, help="repository folder (default: PONY_TRITON_REPO)")
    r.add_argument("--model", default="", help="pipeline of version 1 (default: PONY_SAMPLER_MODEL, else the tiny one)")
    r.set_defaults(func=run_triton_repo)


def run_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from services.stack.tiny import build_tiny_models

    out = writable_folder(Path(args.dir or settings.models_dir), "name a folder you can write: ponyctl models tiny DIR")
    written = build_tiny_models(out, seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


def run_triton_repo(args: argparse.Namespace, settings: Settings) -> int:
    from services.sampler.repository import MODEL_NAME, ModelRepository

    out = Path(args.dir or settings.sampler.triton_repo)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    model = args.model.strip()
    if model:
        # A local path must be a pipeline folder; anything else (a hub id, a URL) is passed on as named.
        local = Path(model)
        if (local.is_absolute() or model.startswith(".")) and not local.is_dir():
            raise UsageError(f"--model: {model} is not a folder")
        settings = settings.replace(sampler_model=str(local.absolute()) if local.is_dir() else model)
    repository = ModelRepository(out)
    try:
        repository.render(settings)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    for version in repository.versions():
        print(f"{MODEL_NAME}\t{version.version}\t{version.uri}")
    return 0
