"""CLIP work per image across the model servers, each figure beside its baseline in one run:

A. dynamic batching: C concurrent clients each sending one-image Score calls (what issue 14 measured) to a scorer
   whose batcher holds one image per model batch (the baseline: no merging) vs one that merges up to --batch-size;
B. one CLIP pass: score, style tag and safety-check the same images by blob key, each service running its own
   CLIP forward from pixels (the baseline) vs the scorer's embeddings passed on to the style tagger and safety.

    .venv/bin/python bench/clip_batching.py [--clients 8] [--requests 16] [--batch-size 32] [--images 32] [--full]

Models: the tiny models built into a temporary folder; `--full` uses a CLIP with ViT-L/14's vision shapes (random
weights, real compute; 768-d, with the LAION head from ../shared/ref) for part A only - meant for a GPU
(`PONY_DEVICE=cuda`).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from prometheus_client import REGISTRY  # noqa: E402

from pony.v1 import (  # noqa: E402
    common_pb2,
    safety_pb2,
    safety_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    style_tagger_pb2,
    style_tagger_pb2_grpc,
)
from pony_common.blobs import BlobStore, image_key  # noqa: E402
from pony_common.catalog.db import catalog_for, upsert  # noqa: E402
from pony_common.catalog.models import ImageRow  # noqa: E402
from pony_common.config import Settings  # noqa: E402
from pony_common.images import image_id  # noqa: E402
from pony_common.models.clip import ClipImageTower  # noqa: E402
from pony_common.testing import ServerLoop  # noqa: E402
from services.safety.app import create_service as create_safety  # noqa: E402
from services.scorer.app import create_service as create_scorer  # noqa: E402
from services.style_tagger.app import create_service as create_style  # noqa: E402
from services.style_tagger.store import StyleStore  # noqa: E402

LAION_HEAD = ROOT.parent / "shared" / "ref" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"


def make_images(count: int, size: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        arr = np.kron(cells, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def batches_run() -> float:
    return REGISTRY.get_sample_value("pony_model_batch_size_count", {"model": "scorer"}) or 0.0


def concurrent_scores(address: str, refs: list[common_pb2.ImageRef], clients: int, requests: int) -> float:
    """`clients` threads, each sending `requests` one-image Score calls; returns images per second."""
    with grpc.insecure_channel(address) as channel:
        stub = scorer_pb2_grpc.ScorerStub(channel)

        def client(c: int) -> int:
            for r in range(requests):
                reply = stub.Score(scorer_pb2.ScoreRequest(images=[refs[(c * requests + r) % len(refs)]]), timeout=600)
                assert not reply.results[0].HasField("error"), reply.results[0].error
            return requests

        stub.Score(scorer_pb2.ScoreRequest(images=refs[:1]), timeout=600)  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = sum(pool.map(client, range(clients)))
        return done / (time.perf_counter() - started)


def part_a(settings: Settings, refs: list[common_pb2.ImageRef], args: argparse.Namespace) -> None:
    rates: dict[str, float] = {}
    batches: dict[str, float] = {}
    configs = {"one image per batch (baseline)": 1, f"merged up to {args.batch_size}": args.batch_size}
    with ServerLoop() as servers:
        for label, size in configs.items():
            s = settings.replace(scorer_batch_size=size, scorer_batch_delay_ms=args.delay_ms)
            running = servers.start(s, create_scorer(s))
            before = batches_run()
            rates[label] = concurrent_scores(f"127.0.0.1:{running.port}", refs, args.clients, args.requests)
            batches[label] = batches_run() - before - 1  # less the warm-up call
            servers.stop(running)
    calls = args.clients * args.requests
    print(f"A. {args.clients} clients x {args.requests} one-image Score calls ({calls} images), scorer over gRPC")
    base = next(iter(rates))
    for label in configs:
        print(
            f"   {label:32s}: {rates[label]:9.1f} images/s  {batches[label]:5.0f} model batches"
            f"  ({calls / max(batches[label], 1):5.2f} images/batch)  x{rates[label] / rates[base]:.2f}"
        )


def fit_styles(settings: Settings, address: str, blobs: list[bytes], refs: list[common_pb2.ImageRef]) -> None:
    """Catalog rows, stored style embeddings and an active cluster set for the style tagger."""
    ids = [image_id(b) for b in blobs]
    with grpc.insecure_channel(address) as channel:
        stub = style_tagger_pb2_grpc.StyleTaggerStub(channel)
        emb = stub.Embed(style_tagger_pb2.StyleTaggerEmbedRequest(images=refs), timeout=600)
        catalog = catalog_for(settings.database_url)
        with catalog.session() as s:
            upsert(s, ImageRow, [{"id": i, "blob_key": i, "category": "other"} for i in ids], keys=["id"])
        vectors = [np.asarray(r.embedding, dtype=np.float32) for r in emb.results]
        StyleStore(catalog).save_embeddings(
            zip(ids, vectors, strict=True), emb.provenance.model, emb.provenance.model_version
        )
        stub.FitClusters(style_tagger_pb2.FitClustersRequest(k=4, activate=True), timeout=600)


def three_stages(stubs: tuple, refs: list[common_pb2.ImageRef], shared: bool, batch: int) -> None:
    scorer, style, safety = stubs
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        scored = scorer.Score(scorer_pb2.ScoreRequest(images=chunk, include_embeddings=shared), timeout=600)
        given = [common_pb2.Embedding(values=r.embedding) for r in scored.results] if shared else []
        style.Tag(style_tagger_pb2.TagRequest(images=chunk, embeddings=given), timeout=600)
        items = [
            safety_pb2.SafetyItem(item_id=str(i), image=ref, embedding=given[i] if shared else None)
            for i, ref in enumerate(chunk)
        ]
        safety.Check(safety_pb2.CheckRequest(items=items), timeout=600)


def part_b(settings: Settings, blobs: list[bytes], refs: list[common_pb2.ImageRef], args: argparse.Namespace) -> None:
    tower = ClipImageTower.shared(settings.model_path("scorer"), settings.device)
    results: dict[str, tuple[float, float]] = {}
    with ServerLoop() as servers:
        ports = [
            servers.start(settings, create(settings)).port for create in (create_scorer, create_style, create_safety)
        ]
        fit_styles(settings, f"127.0.0.1:{ports[1]}", blobs, refs)
        channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        try:
            stubs = (
                scorer_pb2_grpc.ScorerStub(channels[0]),
                style_tagger_pb2_grpc.StyleTaggerStub(channels[1]),
                safety_pb2_grpc.SafetyStub(channels[2]),
            )
            three_stages(stubs, refs[:2], False, args.batch)  # warm-up
            for label, shared in (("each service from pixels (baseline)", False), ("scorer's embedding shared", True)):
                before = tower.forward_images
                started = time.perf_counter()
                three_stages(stubs, refs, shared, args.batch)
                spent = time.perf_counter() - started
                results[label] = ((tower.forward_images - before) / len(refs), len(refs) / spent)
        finally:
            for channel in channels:
                channel.close()
    print(f"B. score + style + safety of {len(refs)} images by blob key, {args.batch} per call")
    base = next(iter(results))
    for label, (forwards, rate) in results.items():
        print(
            f"   {label:36s}: {forwards:4.2f} CLIP forwards/image  {rate:8.1f} images/s  x{rate / results[base][1]:.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="one-image calls per client (part A)")
    parser.add_argument("--batch-size", type=int, default=32, help="the merging scorer's model batch (part A)")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="the batchers' max delay")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="images per call (part B)")
    parser.add_argument("--full", action="store_true", help="ViT-L/14 vision shapes (random weights)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(state_dir=tmp, log_json=False, log_level="WARNING")
        from services.stack.tiny import build_tiny_models

        build_tiny_models(Path(tmp) / "models")
        settings = settings.replace(models_dir=str(Path(tmp) / "models"))
        if args.full:
            from pony_common.models.clip import build_full_clip

            if not LAION_HEAD.is_file():
                parser.error(f"--full needs the 768-d LAION head at {LAION_HEAD}")
            build_full_clip(Path(tmp) / "clip_l14")
            settings = settings.replace(scorer_model=str(Path(tmp) / "clip_l14"), scorer_head=str(LAION_HEAD))
        blobs = make_images(args.images)
        store = BlobStore(settings.blob_url)
        refs = [common_pb2.ImageRef(uri=store.put(image_key(image_id(b), "png"), b)) for b in blobs]
        print(f"model {settings.model_path('scorer')} on {settings.device}")
        part_a(settings, refs, args)
        if not args.full:  # the tiny safety head and style set are 64-d: part B runs on the tiny tower
            part_b(settings, blobs, refs, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
