"""Curation at corpus scale: images/s through the batched curation workflow vs a direct in-process batched loop over
the same models, and what the workflow costs per image, beside the per-image baseline, projected to 30M images.

    .venv/bin/python bench/curation_scale.py [--quick] [--images 192] [--batch-size 64]
        [--redis redis://127.0.0.1:6379/12] [--postgres postgresql://postgres@127.0.0.1:5432/test]

The workflow: the real Redis broker, a fresh PostgreSQL catalog, the four gRPC services (captioner, scorer,
style-tagger, safety) on the tiny models in this process (services.stack.stack_thread) and a Celery worker (solo pool)
on a thread of this process, so every figure is counted where it happens: task messages (`before_task_publish`),
gRPC calls (`grpc_server_started_total`), SQL statements (SQLAlchemy `before_cursor_execute`, the worker's and the
services'; the wait's polling is left out), blob reads (BlobStore.get), decodes (ImageResolver.load and
OpenedImage.decode), CLIP image-tower forwards (`pony_clip_forward_images_total`), and the worker's CPU time per
image (Celery, catalog, gRPC client: the orchestration; the models run on the services' threads). Timed from
submitting the stored images until every one is done; storing them (hash, pHash, blob) is left out of both sides.

The baseline is this same workflow with PONY_CURATION_BATCH_SIZE=1: one image per task, per gRPC call and per claim,
which is the per-image shape of the workflow before issue 14 (its figures on main were 5 messages + 10 result writes,
4 calls, 39 statements per image). The direct loop reads, decodes, captions, embeds and scores, tags the style from
the embedding (plus the palette from pixels) and checks safety on the embedding, `--batch-size` images at a time,
with no broker, gRPC or catalog. Before timing, a warm-up pool goes through the workflow and the style clusters are
fitted (the steady state: style tags come from the stored CLIP embeddings), and the direct loop runs once.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CORPUS = 30_000_000
CURATION_SERVICES = ("pony.v1.Captioner", "pony.v1.Scorer", "pony.v1.StyleTagger", "pony.v1.Safety")


# --- counting where things happen ---------------------------------------------------------------------------------


class Probe:
    """Counts per event, split by whether the worker's threads did it; `main_counts` says whether this (the main)
    thread's SQL counts (submitting does, waiting does not)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.worker_threads: set[int] = set()
        self.main = threading.get_ident()
        self.main_counts = False

    def hit(self, what: str) -> None:
        me = threading.get_ident()
        if me == self.main and not self.main_counts and what == "sql":
            return
        self.counts[what] += 1
        if me in self.worker_threads:
            self.counts[f"worker_{what}"] += 1


def _count_calls(probe: Probe, owner: Any, name: str, what: str) -> None:
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        probe.hit(what)
        return original(*args, **kwargs)

    setattr(owner, name, counted)


def instrument(probe: Probe, engine: Any) -> None:
    """Counters on the catalog engine, Celery publishing, blob reads and image decodes (wrappers that count, then
    call the real method)."""
    from celery.signals import before_task_publish, task_prerun
    from sqlalchemy import event

    from pony_common.blobs import BlobStore
    from pony_common.budgets import OpenedImage
    from pony_common.imagerefs import ImageResolver

    event.listen(engine, "before_cursor_execute", lambda *_a, **_k: probe.hit("sql"))
    before_task_publish.connect(lambda **_k: probe.hit("messages"), weak=False)
    task_prerun.connect(lambda **_k: probe.worker_threads.add(threading.get_ident()), weak=False)
    _count_calls(probe, BlobStore, "get", "blob_reads")
    _count_calls(probe, ImageResolver, "load", "decodes")
    _count_calls(probe, OpenedImage, "decode", "decodes")


def metric_sum(name: str, keep: Callable[[dict[str, str]], bool] = lambda _l: True) -> float:
    from prometheus_client import REGISTRY

    return sum(
        s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == name and keep(s.labels)  # type: ignore
    )


def grpc_calls() -> float:
    return metric_sum("grpc_server_started_total", lambda labels: labels.get("grpc_service") in CURATION_SERVICES)


def clip_forwards() -> float:
    return metric_sum("pony_clip_forward_images_total")


def thread_cpu_s(idents: set[int]) -> float:
    total = 0.0
    for ident in idents:
        with suppress(OSError, ProcessLookupError):
            total += time.clock_gettime(time.pthread_getcpuclockid(ident))
    return total


# --- the two sides --------------------------------------------------------------------------------------------


@dataclass
class Figures:
    label: str
    images: int
    seconds: float
    per_image: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def workflow_run(settings: Any, probe: Probe, pool: Path, label: str) -> Figures:
    """Stores the pool (untimed), then times submit -> every image done, counting per image."""
    from services.curation.dispatch import submit_images, wait_for_images
    from services.curation.ingest import store_items
    from services.curation.sources import iter_source

    ids = store_items(settings, iter_source(str(pool), settings)).ids
    before = dict(probe.counts)
    calls0, clip0 = grpc_calls(), clip_forwards()
    cpu0 = thread_cpu_s(probe.worker_threads)
    start = time.perf_counter()
    main_cpu0 = time.thread_time()
    probe.main_counts = True
    submit_images(settings, ids)
    probe.main_counts = False
    submit_cpu = time.thread_time() - main_cpu0
    counts = wait_for_images(settings, ids, progress=False, timeout_s=3600, poll_s=0.1)
    seconds = time.perf_counter() - start
    if counts.get("done", 0) != len(ids):
        raise SystemExit(f"{label}: the workflow finished {counts}, expected {len(ids)} done")
    n = len(ids)
    delta = {k: v - before.get(k, 0) for k, v in probe.counts.items()}
    per = {
        "task messages": delta.get("messages", 0) / n,
        "gRPC calls": (grpc_calls() - calls0) / n,
        "SQL statements (all)": delta.get("sql", 0) / n,
        "SQL statements (worker)": delta.get("worker_sql", 0) / n,
        "blob reads (services)": (delta.get("blob_reads", 0) - delta.get("worker_blob_reads", 0)) / n,
        "blob reads (worker)": delta.get("worker_blob_reads", 0) / n,
        "decodes": delta.get("decodes", 0) / n,
        "CLIP tower forwards": (clip_forwards() - clip0) / n,
        "orchestration CPU ms": 1000 * (thread_cpu_s(probe.worker_threads) - cpu0 + submit_cpu) / n,
    }
    return Figures(label, n, seconds, per)


class Direct:
    """The same model classes loaded in this process, called batch by batch with nothing in between."""

    def __init__(self, settings: Any) -> None:
        from services.captioner.service import CaptionerService
        from services.safety.service import SafetyService
        from services.scorer.model import ScorerModel
        from services.style_tagger.service import StyleTaggerService

        self.captioner = CaptionerService.from_settings(settings)
        self.scorer = ScorerModel.from_settings(settings)
        self.styles = StyleTaggerService(settings)
        self.safety = SafetyService(settings)
        for model in (self.captioner.model, self.scorer, self.styles.model, self.safety.model):
            model.load()

    def run(self, items: list[Any], batch_size: int) -> float:
        """Seconds for every item, `batch_size` at a time."""
        from pony_common.images import decode_image, image_id
        from services.captioner.service import CaptionJob
        from services.safety.policy import SafetyInput

        start = time.perf_counter()
        for i in range(0, len(items), batch_size):
            part = items[i : i + batch_size]
            datas = [Path(it.uri).read_bytes() for it in part]
            images = [decode_image(d) for d in datas]
            ids = [image_id(d) for d in datas]
            jobs = [
                CaptionJob(image=img, tags=it.tags, characters=it.characters, artists=[it.artist] if it.artist else [])
                for img, it in zip(images, part, strict=True)
            ]
            outcomes = self.captioner.caption(jobs)
            embeddings = self.scorer.embed(images)
            self.scorer.score_embeddings(embeddings, self.scorer.active_head)
            vectors = embeddings.detach().cpu().float().numpy()
            self.styles.tag_vectors(vectors, ids)
            self.styles.palette(images)
            self.safety.check(
                [
                    SafetyInput(
                        item_id=iid,
                        caption=next((c.text for c in out.captions if c.kind == "medium"), ""),
                        tags=tuple(it.tags),
                        characters=tuple(it.characters),
                        embedding=vec,
                    )
                    for iid, out, it, vec in zip(ids, outcomes, part, vectors, strict=True)
                ]
            )
        return time.perf_counter() - start


# --- set-up -----------------------------------------------------------------------------------------------------


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for the run, dropped afterwards."""
    import psycopg

    name = f"pony_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{admin_url.split('://', 1)[1].rsplit('/', 1)[0]}/{name}"
    finally:
        from pony_common.catalog.db import catalog_for

        catalog_for(f"postgresql+psycopg://{admin_url.split('://', 1)[1].rsplit('/', 1)[0]}/{name}").dispose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pool(root: Path, count: int, seed: int, size: int) -> Path:
    """`count` sample images (no duplicates, no corrupt files) in `root`."""
    import shutil

    from services.curation.samples import write_sample_pool

    per = -(-count // 6)
    made = write_sample_pool(root, per_category=per, near_duplicates=0, corrupt=0, blocked=0, size=size, seed=seed)
    keep = sorted(made.images)[:count]
    for rel in set(made.images) - set(keep):
        for f in (made.root / rel).parent.glob(Path(rel).stem + ".*"):
            f.unlink()
    shutil.rmtree(made.root / "duplicates", ignore_errors=True)
    return made.root


def _row(name: str, batched: float, base: float, fmt: str = "{:10.2f}") -> str:
    ratio = f"{base / batched:8.1f}x fewer" if batched > 0 and base > batched else ""
    return f"  {name:28s} {fmt.format(batched)} {fmt.format(base)}   {ratio}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-images", type=int, default=48, help="images of the batch-size-1 run")
    parser.add_argument("--size", type=int, default=96, help="pixels of the sample images")
    parser.add_argument("--quick", action="store_true", help="32 images, batches of 16, 12 for the baseline")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test", help="admin URL")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_size, args.baseline_images = 32, 16, 12
    baseline_images = args.baseline_images
    logging.basicConfig(level=logging.WARNING)

    import redis
    from celery.contrib.testing.worker import start_worker

    from pony_common.catalog.db import catalog_for
    from pony_common.celery_app import configure_app
    from pony_common.config import Settings
    from services.curation.sources import iter_source
    from services.curation.styles import assign_styles
    from services.stack.stack_thread import StackThread

    work = Path(args.workdir or tempfile.mkdtemp(prefix="pony-curation-scale-"))
    models = Path(Settings.from_env().models_dir)
    if not (models / "clip").is_dir():
        from services.stack.tiny import build_tiny_models

        models = work / "models"
        if not (models / "clip").is_dir():
            build_tiny_models(models)
    pools = {
        "warmup": pool(work / "pool-warmup", 12, 100, args.size),
        "batched": pool(work / "pool-batched", args.images, 101, args.size),
        "baseline": pool(work / "pool-baseline", baseline_images, 102, args.size),
    }
    redis.Redis.from_url(args.redis).flushdb()
    with fresh_database(args.postgres) as url:
        settings = Settings.from_env(
            {},
            state_dir=str(work / "state"),
            models_dir=str(models),
            database_url=url,
            broker_url=args.redis,
            result_backend=args.redis,
            log_level="WARNING",
            curation_batch_size=args.batch_size,
            rpc_timeout_s=120.0,
        )
        stack = StackThread(settings)
        try:
            settings = stack.settings
            app = configure_app(settings)
            probe = Probe()
            instrument(probe, catalog_for(url).engine)
            with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, shutdown_timeout=30):
                # The steady state: a first ingest has fitted the style clusters; torch's first calls are paid.
                workflow_run(settings, probe, pools["warmup"], "warm-up")
                styles = assign_styles(settings)
                direct = Direct(settings)
                items = list(iter_source(str(pools["batched"]), settings))
                warm_s = direct.run(items[: args.batch_size], args.batch_size)
                direct_s = direct.run(items, args.batch_size)
                batched = workflow_run(settings, probe, pools["batched"], "batched")
                baseline = workflow_run(
                    settings.replace(curation_batch_size=1), probe, pools["baseline"], "baseline (batch size 1)"
                )
            app.close()
        finally:
            stack.close()
        redis.Redis.from_url(args.redis).flushdb()

    direct_rate = len(items) / direct_s
    out = sys.stdout
    out.write(
        f"curation_scale: tiny models on the CPU, {len(items)} images of {args.size} px, batch size {args.batch_size}; "
        f"baseline = the same workflow with PONY_CURATION_BATCH_SIZE=1 on {baseline.images} images; "
        f"style clusters fitted after the warm-up ({styles.clusters} clusters); direct warm-up pass {warm_s:.1f} s\n\n"
    )
    out.write(f"  {'images/s':28s} {'batched':>10s} {'baseline':>10s} {'direct':>10s}\n")
    out.write(
        f"  {'':28s} {batched.rate:10.2f} {baseline.rate:10.2f} {direct_rate:10.2f}   "
        f"workflow/direct: batched {batched.rate / direct_rate:.2f}, baseline {baseline.rate / direct_rate:.2f}\n\n"
    )
    out.write(f"  {'per image':28s} {'batched':>10s} {'baseline':>10s}\n")
    for key in batched.per_image:
        out.write(_row(key, batched.per_image[key], baseline.per_image[key]))
    out.write(f"\n  projected to {CORPUS / 1e6:.0f}M images{'':6s} {'batched':>10s} {'baseline':>10s}\n")
    for key, unit, scale in (
        ("task messages", "M", 1e6),
        ("gRPC calls", "M", 1e6),
        ("SQL statements (all)", "M", 1e6),
        ("orchestration CPU ms", "worker-hours", 3.6e6),
    ):
        name = "orchestration CPU" if key.startswith("orchestration") else key
        out.write(
            f"  {name + ' (' + unit + ')':28s} {batched.per_image[key] * CORPUS / scale:10.1f} "
            f"{baseline.per_image[key] * CORPUS / scale:10.1f}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
