"""Scorer throughput over gRPC (in-process server on a free port) against a direct call to the same model.

Both paths decode the same JPEG bytes with the same thread pool and score them with the same
`ScorerModel` (one CLIP tower in the process), torch running in a worker thread in both (the servicer
uses asyncio.to_thread); the ratio is what the transport costs. Best of --repeats alternating runs.

    .venv/bin/python bench/scorer_grpc_vs_direct.py            # tiny CLIP + tiny head (CPU)
    .venv/bin/python bench/scorer_grpc_vs_direct.py --full     # CLIP ViT-L/14 shapes, random weights (GPU)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import start_server
from pony_common.images import decode_image, image_id
from pony_common.models.clip import build_full_clip
from services.scorer.app import create_service
from services.scorer.model import ScorerModel

LAION_HEAD = Path("/work/shared/ref/aesthetic/sac+logos+ava1-l14-linearMSE.pth")


def make_settings(work: Path, full: bool, device: str, dtype: str) -> Settings:
    settings = Settings.from_env({}, state_dir=str(work / "state"), device=device, dtype=dtype, log_json=False)
    if not full:
        from services.stack.tiny import build_tiny_models

        build_tiny_models(work / "models")
        return settings.replace(models_dir=str(work / "models"))
    build_full_clip(work / "clip-l14")
    head = str(LAION_HEAD)
    if not LAION_HEAD.is_file():
        from pony_common.models.heads import HeadInfo, MLPHead, save_head

        head = str(save_head(work / "head", MLPHead(768), HeadInfo(kind="aesthetic", in_features=768)))
    return settings.replace(scorer_model=str(work / "clip-l14"), scorer_head=head)


def make_images(count: int, side: int, seed: int = 0) -> list[bytes]:
    """JPEGs of smooth random colour fields (decode cost like photos, not like flat colour)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((side, side), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def rate(run_batch: Callable[[list[bytes]], int], images: list[bytes], batch: int, device: str) -> float:
    """Images per second scoring `images` in calls of `batch` (after one warm-up call)."""
    run_batch(images[:batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    done = 0
    for i in range(0, len(images) - batch + 1, batch):
        done += run_batch(images[i : i + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="CLIP ViT-L/14 shapes with random weights")
    parser.add_argument("--images", type=int, default=0, help="images per batch size (default 128 tiny, 1024 full)")
    parser.add_argument("--side", type=int, default=0, help="image side in pixels (default 96 tiny, 512 full)")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    count = args.images or (1024 if args.full else 128)
    side = args.side or (512 if args.full else 96)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), args.full, args.device, dtype)
        settings = settings.replace(scorer_batch_size=max(batches), scorer_head_from_catalog=False)
        images = make_images(count, side)

        # direct: the same model class and decode pool the servicer uses, no transport
        scorer = ScorerModel.from_settings(settings)
        scorer.load()
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

        worker = ThreadPoolExecutor(max_workers=1)  # torch runs off the main thread, as in the servicer

        def direct_call(batch: list[bytes]) -> int:
            decoded = list(pool.map(lambda b: (image_id(b), decode_image(b)), batch))
            scored = scorer.score_images([img for _, img in decoded])
            return len(scored.values)

        def direct(batch: list[bytes]) -> int:
            return worker.submit(direct_call, batch).result()

        # gRPC: the real service on a free port in this process
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        running = asyncio.run_coroutine_threadsafe(
            start_server(settings, create_service(settings), port=0, host="127.0.0.1"), loop
        ).result(60)
        asyncio.run_coroutine_threadsafe(running.wait_ready(600), loop).result(620)
        channel = grpc.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.max_send_message_length", 256 << 20)]
        )
        stub = scorer_pb2_grpc.ScorerStub(channel)

        def over_grpc(batch: list[bytes]) -> int:
            request = scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=b) for b in batch])
            reply = stub.Score(request, timeout=600)
            assert not any(r.HasField("error") for r in reply.results)
            return len(reply.results)

        print(
            f"scorer: {'CLIP ViT-L/14 (random weights)' if args.full else 'tiny CLIP'} on {args.device} ({dtype}), "
            f"{count} JPEGs of {side}x{side}, head {Path(settings.scorer.head or 'tiny').name}"
        )
        print(f"{'batch':>5}  {'direct img/s':>12}  {'gRPC img/s':>10}  {'gRPC/direct':>11}")
        try:
            for batch in batches:
                n = count if batch > 1 else min(count, 128)
                d = g = 0.0
                for _ in range(args.repeats):  # alternate, keep the best of each (shared machines are noisy)
                    d = max(d, rate(direct, images[:n], batch, args.device))
                    g = max(g, rate(over_grpc, images[:n], batch, args.device))
                print(f"{batch:>5}  {d:>12.1f}  {g:>10.1f}  {g / d:>11.2f}")
        finally:
            channel.close()
            asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            pool.shutdown()
            worker.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
