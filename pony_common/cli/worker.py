"""`ponyctl worker`: a Celery worker on the configured broker, consuming the named queues."""

from __future__ import annotations

import argparse
import importlib

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", "-Q", default="", help="comma-separated queues (default: all)")
    p.add_argument("--concurrency", "-c", type=int, default=None)
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument("--include", "-I", action="append", default=[], help="extra task module to import")
    p.add_argument("--hostname", "-n", default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.celery_app import QUEUES, app, configure_app
    from pony_common.celery_metrics import serve_worker_metrics
    from pony_common.tracing import setup_tracing, setup_tracing_in_children

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] or list(QUEUES)
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise UsageError(f"unknown queue(s) {', '.join(unknown)}; known: {', '.join(QUEUES)}")
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    configure_app(settings)
    for module in args.include:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"--include {module}: {exc}") from None
    app.conf.include = [*app.conf.include, *args.include]
    # A prefork pool's processes run the tasks: their metrics are merged from files (prometheus multiprocess mode).
    serve_worker_metrics(settings, app, queues, multiprocess=args.pool == "prefork")
    if args.pool == "prefork":
        setup_tracing_in_children(settings)
    else:
        setup_tracing(settings, service_name="pony-worker")
    argv = ["worker", "-Q", ",".join(queues), "--pool", args.pool, "--loglevel", settings.log_level.upper()]
    argv += ["--concurrency", str(args.concurrency or settings.worker_concurrency)]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0
