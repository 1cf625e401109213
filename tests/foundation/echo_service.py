"""A service used to test the gRPC bootstrap itself: `pony.v1.Scorer/Score` whose behaviour follows the request,
so each domain error, a slow call and an unexpected crash can be provoked. (It tests the transport, not a model.)"""

from __future__ import annotations

import asyncio
import sys
import threading

from grpc import aio

from pony.v1 import captioner_pb2, captioner_pb2_grpc, scorer_pb2, scorer_pb2_grpc
from pony_common import errors
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition, serve_forever


class EchoScorer(scorer_pb2_grpc.ScorerServicer):
    async def Score(self, request: scorer_pb2.ScoreRequest, context: aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        if not request.images:
            raise errors.InvalidArgument("images", "at least one image is required")
        uri = request.images[0].uri
        if uri == "overload":
            raise errors.Overloaded("too many requests in flight")
        if uri == "down":
            raise errors.DependencyUnavailable("the catalog database is down")
        if uri == "boom":
            raise RuntimeError("secret internals: password=hunter2")
        if uri.startswith("slow:"):
            await asyncio.sleep(float(uri.split(":", 1)[1]))
        return scorer_pb2.ScoreResponse(results=[scorer_pb2.ScoreResult(image_id=uri, score_tag="score_5")])


class EchoCaptioner(captioner_pb2_grpc.CaptionerServicer):
    """A stream of one large result per item (to be cancelled by the client)."""

    async def CaptionStream(self, request: captioner_pb2.CaptionStreamRequest, context: aio.ServicerContext):
        for i, item in enumerate(request.items):
            # Large results without a pause: the stream stalls on flow control, suspended at its yield.
            caption = captioner_pb2.Caption(text="x" * 256 * 1024)
            yield captioner_pb2.CaptionStreamResponse(
                result=captioner_pb2.CaptionResult(item_id=item.item_id, captions=[caption]),
                done=i + 1,
                total=len(request.items),
            )


def register(server: aio.Server) -> None:
    scorer_pb2_grpc.add_ScorerServicer_to_server(EchoScorer(), server)
    captioner_pb2_grpc.add_CaptionerServicer_to_server(EchoCaptioner(), server)


def create_service(settings: Settings, gate: threading.Event | None = None) -> ServiceDefinition:
    def load() -> None:
        if gate is not None and not gate.wait(30):
            raise TimeoutError("load gate never opened")

    return ServiceDefinition(
        name="scorer",
        full_names=["pony.v1.Scorer", "pony.v1.Captioner"],
        register=register,
        load=load,
    )


if __name__ == "__main__":
    # python -m tests.foundation.echo_service PORT: serves until SIGTERM (used by the graceful-shutdown test).
    port = int(sys.argv[1])
    settings = Settings.from_env({}, scorer_addr=f"127.0.0.1:{port}", bind_host="127.0.0.1", shutdown_grace_s=10)
    asyncio.run(serve_forever(settings, [create_service(settings)]))
