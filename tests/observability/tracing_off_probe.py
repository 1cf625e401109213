"""Run as a script (a process where tracing was never set up): a call made under a propagated trace context sends
that context on, through a gRPC call (the server's log line carries it) and into a Celery message's headers.
Prints one JSON object with what it saw."""

from __future__ import annotations

import io
import json
import logging
import sys

from opentelemetry import context, propagate

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common import tracing
from pony_common.config import Settings
from pony_common.grpc.client import channel
from pony_common.logs import JsonFormatter
from pony_common.testing import ServerLoop
from tests.foundation.echo_service import create_service

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def main() -> int:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pony_common.grpc.interceptors")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    settings = Settings.from_env({}, state_dir=sys.argv[1])
    with ServerLoop() as servers:
        running = servers.start(settings, create_service(settings))
        token = context.attach(propagate.extract({"traceparent": TRACEPARENT}))
        try:
            stub = scorer_pb2_grpc.ScorerStub(channel(settings, f"127.0.0.1:{running.port}"))
            stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri="x")]), timeout=10)
            headers: dict[str, object] = {"id": "task-1"}
            tracing._before_publish(sender="pony.ping", headers=headers, routing_key="default")
        finally:
            context.detach(token)
        untraced: dict[str, object] = {"id": "task-2"}
        tracing._before_publish(sender="pony.ping", headers=untraced, routing_key="default")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    print(
        json.dumps(
            {
                "provider_installed": tracing._provider is not None,
                "log_trace_ids": [line.get("trace_id", "") for line in lines if line["msg"] == "rpc"],
                "header": headers.get("traceparent", ""),
                "untraced_header": untraced.get("traceparent", ""),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
