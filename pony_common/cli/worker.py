"""`ponyctl worker`: a Celery worker on the configured broker, consuming the named queues; `ponyctl worker --probe`:
whether that worker is alive and connected (its heartbeat file is fresh), for Kubernetes exec probes."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", "-Q", default="", help="comma-separated queues (default: all)")
    p.add_argument("--concurrency", "-c", type=int, default=None, help="processes (default: PONY_WORKER_CONCURRENCY)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"], help="Celery pool")
    p.add_argument("--include", "-I", action="append", default=[], help="extra task module to import")
    p.add_argument("--hostname", "-n", default=None, help="worker node name (default: Celery's)")
    p.add_argument(
        "--probe",
        action="store_true",
        help="start no worker: exit 0 when the worker's heartbeat (PONY_WORKER_HEARTBEAT_FILE) is fresh, else 1",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=None,
        help="with --probe: the oldest heartbeat accepted, in seconds (default 3 x PONY_WORKER_HEARTBEAT_S)",
    )
    p.set_defaults(func=run, logs="stderr")  # JSON lines on stderr: the log a collector reads


def probe(args: argparse.Namespace, settings: Settings) -> int:
    """0 when the heartbeat is fresh (the worker consumes, connected to its broker); 1 with the reason on stderr."""
    from pony_common.worker_heartbeat import STALE_AFTER_BEATS, check

    max_age = args.max_age if args.max_age is not None else STALE_AFTER_BEATS * settings.worker_heartbeat_s
    if max_age <= 0:
        raise UsageError("--max-age must be more than 0 seconds")
    problem = check(Path(settings.worker_heartbeat_file), max_age)
    if problem is not None:
        sys.stderr.write(f"ponyctl worker --probe: {problem}\n")
        return 1
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.probe:
        return probe(args, settings)
    if args.max_age is not None:
        raise UsageError("--max-age only goes with --probe")
    if settings.worker_heartbeat_s <= 0:
        raise UsageError("PONY_WORKER_HEARTBEAT_S must be more than 0 seconds")
    from pony_common import worker_heartbeat
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
    # A heartbeat left by an earlier worker in this pod (a restarted container keeps /tmp) must not vouch for this one.
    worker_heartbeat.clear(Path(settings.worker_heartbeat_file))
    worker_heartbeat.install(app)
    argv = ["worker", "-Q", ",".join(queues), "--pool", args.pool, "--loglevel", settings.log_level.upper()]
    argv += ["--concurrency", str(args.concurrency or settings.worker_concurrency)]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0
