"""Style tags per second through gRPC (`pony.v1.StyleTagger/Tag`) vs in-process (`StyleTaggerService.tag`), same model,
same images, same batch size; prints both and their ratio.

    .venv/bin/python bench/style_grpc_vs_direct.py [--images 64] [--batch 16] [--rounds 5] [--size 256]

Models: PONY_MODELS_DIR when it holds `clip/`, else the tiny models built into a temporary folder. Both paths
start from the same encoded PNG bytes (the in-process path decodes them too), so the difference is transport.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc import aio  # noqa: E402

from pony.v1 import common_pb2, style_tagger_pb2, style_tagger_pb2_grpc  # noqa: E402
from pony_common.catalog.db import catalog_for, upsert  # noqa: E402
from pony_common.catalog.models import ImageRow  # noqa: E402
from pony_common.config import Settings  # noqa: E402
from pony_common.grpc.server import start_server  # noqa: E402
from pony_common.images import decode_image, image_id  # noqa: E402
from services.style_tagger.app import create_service  # noqa: E402
from services.style_tagger.service import FitParams, StyleTaggerService  # noqa: E402


def make_images(count: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        arr = np.kron(cells, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def prepare(settings: Settings, blobs: list[bytes]) -> StyleTaggerService:
    """Loads the tagger, stores the images' style embeddings and fits an active cluster set."""
    tagger = StyleTaggerService(settings)
    tagger.model.load()
    ids = [image_id(b) for b in blobs]
    with catalog_for(settings.database_url).session() as s:
        upsert(s, ImageRow, [{"id": i, "blob_key": i, "category": "other"} for i in ids], keys=["id"])
    vectors = tagger.embed([decode_image(b) for b in blobs])
    tagger.store.save_embeddings(zip(ids, vectors, strict=True), tagger.model_id, tagger.model_version)
    tagger.fit_clusters(FitParams(k=4, activate=True))
    return tagger


def batches(blobs: list[bytes], size: int) -> list[list[bytes]]:
    return [blobs[i : i + size] for i in range(0, len(blobs), size)]


def tag_direct(tagger: StyleTaggerService, chunks: list[list[bytes]]) -> int:
    """One pass in-process: decode the same bytes, then `StyleTaggerService.tag` per batch. Returns tags made."""
    n = 0
    for chunk in chunks:
        images = [decode_image(b) for b in chunk]
        n += len(tagger.tag(images, [image_id(b) for b in chunk]))
    return n


async def measure(settings: Settings, tagger: StyleTaggerService, blobs: list[bytes], batch: int, rounds: int):
    """(in-process tags/s, gRPC tags/s); rounds alternate the two paths so background load hits both alike."""
    running = await start_server(settings, create_service(settings, tagger), port=0, host="127.0.0.1")
    try:
        await running.wait_ready(300)
        limit = settings.max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        chunks = batches(blobs, batch)
        async with aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
            stub = style_tagger_pb2_grpc.StyleTaggerStub(channel)
            requests = [
                style_tagger_pb2.TagRequest(images=[common_pb2.ImageRef(data=b) for b in chunk]) for chunk in chunks
            ]

            async def tag_grpc() -> int:
                n = 0
                for request in requests:
                    response = await stub.Tag(request)
                    n += sum(1 for r in response.results if not r.error.reason)
                return n

            tag_direct(tagger, chunks)  # warm-up both paths
            await tag_grpc()
            spent = {"direct": 0.0, "grpc": 0.0}
            tags = {"direct": 0, "grpc": 0}
            for _ in range(rounds):
                started = time.perf_counter()
                tags["direct"] += tag_direct(tagger, chunks)
                spent["direct"] += time.perf_counter() - started
                started = time.perf_counter()
                tags["grpc"] += await tag_grpc()
                spent["grpc"] += time.perf_counter() - started
            return tags["direct"] / spent["direct"], tags["grpc"] / spent["grpc"]
    finally:
        await running.stop(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(state_dir=tmp, log_json=False)
        if not (Path(settings.models_dir) / "clip").is_dir():
            from services.stack.tiny import build_tiny_models

            build_tiny_models(Path(tmp) / "models")
            settings = settings.replace(models_dir=str(Path(tmp) / "models"))
        blobs = make_images(args.images, args.size)
        tagger = prepare(settings, blobs)
        direct, grpc_rate = asyncio.run(measure(settings, tagger, blobs, args.batch, args.rounds))

    print(f"model {tagger.model_id} ({tagger.dim}-d), {args.images} images of {args.size}px, batch {args.batch}")
    print(f"in-process StyleTagger.tag : {direct:10.1f} tags/s (baseline)")
    print(f"gRPC StyleTagger/Tag       : {grpc_rate:10.1f} tags/s")
    print(f"ratio gRPC / in-process    : {grpc_rate / direct:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
