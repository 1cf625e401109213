"""`ponyctl serve <service>`: runs one gRPC service until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

from pony_common.cli.errors import UsageError
from pony_common.config import Settings
from pony_common.services import SERVICE_MODULES, canonical, create_service


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a gRPC service")
    p.add_argument("service", help=f"one of: {', '.join(SERVICE_MODULES)}")
    p.add_argument("--port", type=int, default=None, help="port to bind (default: the service's DESIGN port)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
