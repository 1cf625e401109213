"""What our instrumentation adds to an RPC: the same scorer calls (tiny models, in-process server on a free port)
against one servicer served twice at once:

  bare          a plain grpc.aio server and a plain channel: no interceptor, no metrics, no log line, no spans;
  instrumented  the server as every service runs (the shared interceptor: request id, RPC metrics,
                one JSON log line per call at INFO, SERVER span) and a channel with the CLIENT-span interceptor.

First with tracing off (the default: no provider; an incoming context is still passed on), then with tracing on as
in the cluster: sampled spans (--sample-ratio, PONY_TRACE_SAMPLE_RATIO) exported over OTLP/gRPC, batched, to a
collector on localhost. Short blocks of calls alternate bare and instrumented; the figures are the medians of the
per-block means, wall time and process CPU time (client, server and exporter threads of this process: the part
other processes on a shared machine cannot inflate). `Score` runs the model (decode + tiny CLIP + head);
`ScoreEmbeddings` only the head (nearly pure transport: the worst case for a relative overhead).

    .venv/bin/python bench/instrumentation_overhead.py [--calls 20] [--rounds 40] [--sample-ratio 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import start_server
from pony_common.logs import JsonFormatter
from pony_common.tracing import ClientInterceptor, setup_tracing
from services.scorer.app import create_service

OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Collector:
    """An OTLP/gRPC trace collector on localhost that counts the spans it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # type: ignore[no-untyped-def]
                collector.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").resize((64, 64))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def compare(name: str, bare: Callable[[], object], inst: Callable[[], object], calls: int, rounds: int) -> float:
    """Median per-call wall time and process CPU time (client + server threads: the part other processes on a
    shared machine cannot inflate) over `rounds` short blocks, alternating which variant goes first."""
    for fn in (bare, inst):  # warm-up
        for _ in range(10):
            fn()
    wall: dict[int, list[float]] = {0: [], 1: []}
    cpu: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            fn = (bare, inst)[k]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            wall[k].append((time.perf_counter() - w0) / calls * 1e6)
            cpu[k].append((time.process_time() - c0) / calls * 1e6)
    wb, wi = statistics.median(wall[0]), statistics.median(wall[1])
    cb, ci = statistics.median(cpu[0]), statistics.median(cpu[1])
    print(f"{name:<34} {wb:>9.0f} {wi:>9.0f} {wi / wb:>7.3f} | {cb:>9.0f} {ci:>9.0f} {ci / cb:>7.3f}")
    return wi / wb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="calls per block")
    parser.add_argument("--rounds", type=int, default=40, help="blocks per variant, alternating")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="PONY_TRACE_SAMPLE_RATIO when tracing is on")
    parser.add_argument("--embeddings", type=int, default=8, help="embeddings per ScoreEmbeddings call")
    parser.add_argument("--images", type=int, default=2, help="images per Score call")
    parser.add_argument(
        "--full", action="store_true", help="CLIP ViT-L/14 shapes (random weights): a real model's work per call"
    )
    args = parser.parse_args(argv)
    # Production logging: one JSON line per call at INFO (written to /dev/null here, not to the terminal).
    devnull = open(os.devnull, "w")  # noqa: SIM115
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        from services.stack.tiny import build_tiny_models

        build_tiny_models(Path(tmp) / "models")
        settings = Settings.from_env(
            {}, state_dir=str(Path(tmp) / "state"), models_dir=str(Path(tmp) / "models"), scorer_head_from_catalog=False
        )
        if args.full:
            from pony_common.models.clip import build_full_clip
            from pony_common.models.heads import HeadInfo, MLPHead, save_head

            build_full_clip(Path(tmp) / "clip-l14")
            head = save_head(Path(tmp) / "head-l14", MLPHead(768), HeadInfo(kind="aesthetic", in_features=768))
            settings = settings.replace(scorer_model=str(Path(tmp) / "clip-l14"), scorer_head=str(head))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()

        def run(coro, timeout: float = 600):  # type: ignore[no-untyped-def]
            return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

        definition = create_service(settings)
        running = run(start_server(settings, definition, port=0, host="127.0.0.1"))
        run(running.wait_ready(600))

        async def start_bare() -> tuple[aio.Server, int]:
            server = aio.server(options=OPTIONS)
            definition.register(server)  # the same servicer (and model) as the instrumented server
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        bare_server, bare_port = run(start_bare())
        bare = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=OPTIONS))
        inst_channel = grpc.intercept_channel(
            grpc.insecure_channel(f"127.0.0.1:{running.port}", options=OPTIONS), ClientInterceptor()
        )
        inst = scorer_pb2_grpc.ScorerStub(inst_channel)
        # The two halves on their own (breakdown): our client interceptor to the bare server, a plain channel to ours.
        client_only_channel = grpc.intercept_channel(
            grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=OPTIONS), ClientInterceptor()
        )
        client_only = scorer_pb2_grpc.ScorerStub(client_only_channel)
        server_only = scorer_pb2_grpc.ScorerStub(grpc.insecure_channel(f"127.0.0.1:{running.port}", options=OPTIONS))

        images = [common_pb2.ImageRef(data=png(i)) for i in range(args.images)]
        score = scorer_pb2.ScoreRequest(images=images)
        dim = bare.Embed(scorer_pb2.EmbedRequest(images=images[:1])).dim
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.embeddings, dim)).astype(np.float32)
        score_emb = scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=v) for v in vectors])

        print(
            f"scorer on {'CLIP ViT-L/14 shapes' if args.full else 'tiny models'}, CPU; "
            f"{args.calls} calls x {args.rounds} rounds per variant, sequential; "
            f"Score: {args.images} PNGs of 64x64, ScoreEmbeddings: {args.embeddings} x {dim}"
        )
        print(f"{'':<34} {'wall us/call':^27} | {'process CPU us/call':^27}")
        print(f"{'RPC (tracing)':<34} {'bare':>9} {'instr.':>9} {'ratio':>7} | {'bare':>9} {'instr.':>9} {'ratio':>7}")
        try:
            ratios = {}
            for label, request, method in (
                ("Score", score, "Score"),
                ("ScoreEmbeddings", score_emb, "ScoreEmbeddings"),
            ):
                b, i = getattr(bare, method), getattr(inst, method)
                ratios[(label, "off")] = compare(
                    f"{label} (tracing off)",
                    lambda b=b, r=request: b(r),
                    lambda i=i, r=request: i(r),
                    args.calls,
                    args.rounds,
                )
            for label, stub in (("client interceptor only", client_only), ("server interceptor only", server_only)):
                compare(
                    f"  ScoreEmbeddings: {label}",
                    lambda: bare.ScoreEmbeddings(score_emb),
                    lambda stub=stub: stub.ScoreEmbeddings(score_emb),
                    args.calls,
                    args.rounds,
                )
            collector = Collector()
            setup_tracing(
                settings.replace(
                    otlp_endpoint=f"http://127.0.0.1:{collector.port}", trace_sample_ratio=args.sample_ratio
                ),
                service_name="pony-bench",
            )
            for label, request, method in (
                ("Score", score, "Score"),
                ("ScoreEmbeddings", score_emb, "ScoreEmbeddings"),
            ):
                b, i = getattr(bare, method), getattr(inst, method)
                ratios[(label, "on")] = compare(
                    f"{label} (on, OTLP, sampled {args.sample_ratio:g})",
                    lambda b=b, r=request: b(r),
                    lambda i=i, r=request: i(r),
                    args.calls,
                    args.rounds,
                )
            from opentelemetry import trace

            trace.get_tracer_provider().force_flush()  # type: ignore[attr-defined]
            instrumented_calls = 2 * (args.rounds * args.calls + 10)
            print(
                f"spans received by the collector: {collector.spans} "
                f"(a client and a server span per sampled call of {instrumented_calls} instrumented calls)"
            )
            worst = max(ratios.values())
            print(f"target: under 5% added (wall). Score: {100 * (ratios[('Score', 'off')] - 1):+.1f}% tracing off, "
                  f"{100 * (ratios[('Score', 'on')] - 1):+.1f}% tracing on; worst (ScoreEmbeddings): "
                  f"{100 * (worst - 1):+.1f}%")  # fmt: skip
        finally:
            inst_channel.close()
            client_only_channel.close()
            run(bare_server.stop(0))
            run(running.stop(0))
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            devnull.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
