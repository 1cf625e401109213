"""`ponyctl demo`: the whole loop on one machine with the embedded default.

Tiny models -> a synthetic sample pool -> every service on localhost (Triton included) and a Celery worker on
the embedded SQLite broker -> ingest (caption, score, style, safety) -> select -> export -> a short training
run through the local executor -> the checkpoint published as a new `pony_v7` version -> images generated
through the sampler with that version -> the HTML report. A second run reuses what the first built."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pony_common.config import Settings
from pony_common.errors import PonyError

TINY_MARKER = ".pony-tiny-models"
# Order matters: a service learns the addresses of those started before it (the sampler finds safety, the
# trainer finds the sampler it publishes new versions to).
STACK = ("captioner", "scorer", "style-tagger", "safety", "sampler", "trainer")
DEMO_PROMPTS = (
    ("a pony with a rainbow mane on a hill at sunrise", "pony"),
    ("an anime girl with long blue hair under cherry blossoms", "anime"),
)


class DemoFailed(PonyError):
    """A step of the demo did not give the result the next step needs (ponyctl exits 1 with this line)."""


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


@dataclass
class DemoOptions:
    """Knobs of the demo; the end-to-end test shrinks them."""

    fresh: bool = False
    free_ports: bool = False
    per_category: int = 9
    select_total: int = 40
    train_steps: int = 4
    generate_size: int = 64
    generate_steps: int = 4
    timeout_s: float = 900.0


@dataclass
class DemoResult:
    """Where everything is, and the figures the demo printed."""

    state_dir: Path
    samples: Path
    export_dir: Path
    report: Path
    outputs: list[Path] = field(default_factory=list)
    blocked_outputs: list[str] = field(default_factory=list)
    blocked_pool: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    selected: int = 0
    run_id: str = ""
    model_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def ensure_tiny_models(settings: Settings) -> Path:
    """Builds the tiny models once; a second run reuses them."""
    out = Path(settings.models_dir)
    if (out / TINY_MARKER).exists():
        say(f"models   reusing tiny models in {out}")
        return out
    from services.stack.tiny import build_tiny_models

    build_tiny_models(out)
    (out / TINY_MARKER).write_text("built by ponyctl demo\n")
    say(f"models   built tiny models in {out}")
    return out


def ensure_sample_pool(settings: Settings, per_category: int) -> Path:
    from services.curation.samples import write_sample_pool

    root = Path(settings.state_dir) / "samples"
    marker = root / ".pony-sample-pool.json"
    if marker.exists():
        say(f"samples  reusing the sample pool in {root}")
        return root
    pool = write_sample_pool(root, per_category=per_category)
    marker.write_text(json.dumps({"images": len(pool.images), "corrupt": pool.corrupt, "blocked": pool.blocked}))
    duplicates = len(pool.near_duplicates) + len(pool.exact_duplicates)
    say(
        f"samples  wrote {len(pool.images) + duplicates + len(pool.corrupt)} files to {root}: "
        f"{len(pool.images)} images ({len(pool.blocked)} to be blocked), {duplicates} duplicates, "
        f"{len(pool.corrupt)} corrupt"
    )
    return root


def demo_settings(settings: Settings, free_ports: bool) -> Settings:
    """Ports for Triton (the services get theirs from the stack); free ones when asked."""
    if not free_ports:
        return settings
    from services.stack.netports import free_port

    http, grpc_port, metrics = free_port(), free_port(), free_port()
    return settings.replace(
        triton_http_port=http,
        triton_grpc_port=grpc_port,
        triton_metrics_port=metrics,
        triton_url=f"127.0.0.1:{grpc_port}",
    )


def train_and_publish(settings: Settings, manifest: Path, steps: int, timeout_s: float) -> Any:
    """Submits a short two-stage run to the trainer service over gRPC and follows it to the end."""
    import yaml

    from pony.v1 import trainer_pb2
    from services.trainer.client import TrainerClient
    from services.trainer.local_run import demo_spec

    spec = yaml.safe_dump(demo_spec(manifest, name="demo", steps=steps))
    client = TrainerClient(settings)
    run = client.submit_run(spec).run
    say(f"train    submitted run {run.run_id} ({steps} steps: 32 px buckets, then 64 px)")
    last = run
    for event in client.watch_run(run.run_id, timeout=timeout_s):
        last = event.run
        ev = event.event
        if ev.kind == trainer_pb2.RUN_EVENT_KIND_LOSS and ev.HasField("loss"):
            say(f"train    step {ev.step:>3}  loss {ev.loss:.4f}")
        elif ev.kind == trainer_pb2.RUN_EVENT_KIND_STATE:
            say(f"train    {trainer_pb2.RunState.Name(ev.state).removeprefix('RUN_STATE_').lower()} {ev.message}")
        if last.state in (trainer_pb2.RUN_STATE_SUCCEEDED, trainer_pb2.RUN_STATE_FAILED,
                          trainer_pb2.RUN_STATE_CANCELLED):  # fmt: skip
            break
    return client.get_run(run.run_id).run


def generate_images(settings: Settings, out_dir: Path, size: int, steps: int) -> tuple[list[Path], list[str], str]:
    """Text-to-image through the sampler (gRPC -> Triton), PNGs with their parameters, blocked ones reported."""
    from services.sampler.client import SamplerClient

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    blocked: list[str] = []
    version = ""
    with SamplerClient(settings) as client:
        for i, (prompt, source) in enumerate(DEMO_PROMPTS):
            resp = client.generate(
                prompt, seed=i, width=size, height=size, steps=steps, score=9, source=source, rating="safe"
            )
            version = resp.provenance.model_version or version
            for j, image in enumerate(resp.images):
                path = out_dir / f"demo-{i}-{j}.png"
                path.write_bytes(image.png)
                written.append(path)
            for b in resp.blocked:
                blocked.append(f"seed {b.seed}: " + "; ".join(f"{r.rule_id} {r.message}" for r in b.reasons))
    return written, blocked, str(version)


def blocked_images(settings: Settings) -> dict[str, str]:
    """Images of the pool that safety blocked, with the rule ids that blocked them."""
    from sqlalchemy import select

    from pony_common.catalog import catalog_for
    from pony_common.catalog.models import SafetyDecisionRow

    with catalog_for(settings.database_url).session() as s:
        rows = s.scalars(select(SafetyDecisionRow).where(SafetyDecisionRow.decision == "block")).all()
    return {r.image_id: ", ".join(str(x.get("rule_id", x)) if isinstance(x, dict) else str(x) for x in r.reasons)
            for r in rows}  # fmt: skip


@contextlib.contextmanager
def quiet_logs(state: Path) -> Iterator[Path]:
    """The demo talks to a person: JSON logs of every service go to a file, only warnings reach the terminal.
    The handlers' levels are restored afterwards."""
    import logging

    from pony_common.logs import JsonFormatter

    path = state / "demo.log"
    root = logging.getLogger()
    before = [(h, h.level) for h in root.handlers]
    root_level = root.level
    for handler, _ in before:
        handler.setLevel(max(handler.level, logging.WARNING))
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(JsonFormatter())
    file_handler.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.setLevel(min(root_level, logging.INFO) if root_level else logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(root_level)
        for handler, level in before:
            handler.setLevel(level)


def run_demo(settings: Settings, options: DemoOptions | None = None) -> DemoResult:
    """Runs the whole loop and returns where everything is. Raises on failure (the CLI turns that into exit 1)."""
    opts = options or DemoOptions()
    state = Path(settings.state_dir)
    if opts.fresh and state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    with quiet_logs(state) as log_path:
        return _run_demo(settings, opts, log_path)


def _run_demo(settings: Settings, opts: DemoOptions, log_path: Path) -> DemoResult:
    from pony.v1 import trainer_pb2
    from pony_common.catalog import catalog_for
    from pony_common.workers import CURATION_QUEUES, start_worker, stop_worker
    from services.curation.export import export_selection
    from services.curation.ingest import ingest_source
    from services.curation.report import write_report
    from services.curation.selection import select_images
    from services.curation.status import curation_status
    from services.stack.stack_thread import StackThread

    state = Path(settings.state_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say(f"demo     state in {state} (service logs: {log_path})")
    ensure_tiny_models(settings)
    samples = ensure_sample_pool(settings, opts.per_category)
    timings["prepare_s"] = time.perf_counter() - t0

    settings = demo_settings(settings, opts.free_ports)
    t = time.perf_counter()
    say("stack    starting captioner, scorer, style-tagger, safety, sampler (+ tritonserver), trainer ...")
    stack = StackThread(settings, STACK, free_ports=opts.free_ports, ready_timeout=opts.timeout_s)
    worker = None
    try:
        live = stack.settings
        for name in STACK:
            say(f"stack    {name:<13} {live.addr(name.replace('-', '_'))}")
        say(
            f"stack    tritonserver  {live.sampler.triton_url} "
            f"(http {live.sampler.triton_http_port}, metrics {live.sampler.triton_metrics_port})"
        )
        worker = start_worker(live, (*CURATION_QUEUES, "default"), name="demo", log_path=state / "worker.log")
        say(f"stack    celery worker on {live.broker_url.split('://', 1)[0]} (log {state / 'worker.log'})")
        timings["stack_s"] = time.perf_counter() - t

        t = time.perf_counter()
        summary = ingest_source(live, str(samples), wait=True, progress=True, timeout_s=opts.timeout_s)
        status = curation_status(catalog_for(live.database_url))
        counts = {k: int(v) for k, v in status.images.items()}
        say(
            f"ingest   {len(summary.ids)} images ({summary.new} new), "
            f"{len(summary.submitted)} curated in this run; catalog: "
            + ", ".join(f"{n} {state_name}" for state_name, n in counts.items())
        )
        for failure in status.failures[:5]:
            say(f"ingest     failed {failure.image_id[:12]} at {failure.stage}: {failure.reason}")
        blocked_pool = blocked_images(live)
        for image_id, reasons in blocked_pool.items():
            say(f"safety   blocked {image_id[:12]}: {reasons}")
        timings["ingest_s"] = time.perf_counter() - t

        t = time.perf_counter()
        report = select_images(live, opts.select_total)
        say(f"select   {report.selected} of {opts.select_total} wanted; achieved mix:")
        for cat in report.categories:
            say(
                f"select     {cat.category:<8} target {cat.target_share:>5.0%}  achieved {cat.achieved_share:>5.0%}"
                f"  ({cat.selected}/{cat.target}, {cat.available} available)"
            )
        export_dir = state / "export"
        exported = export_selection(live, export_dir)
        say(f"export   {exported.rows} rows -> {exported.manifest}")
        timings["select_export_s"] = time.perf_counter() - t

        t = time.perf_counter()
        run = train_and_publish(live, exported.manifest, opts.train_steps, opts.timeout_s)
        if run.state != trainer_pb2.RUN_STATE_SUCCEEDED:
            state_name = trainer_pb2.RunState.Name(run.state)
            raise DemoFailed(f"training run {run.run_id} ended {state_name}: {run.reason}")
        say(f"train    run {run.run_id} succeeded; published as pony_v7 version {run.model_version}")
        timings["train_s"] = time.perf_counter() - t

        t = time.perf_counter()
        outputs, blocked, served = generate_images(live, state / "outputs", opts.generate_size, opts.generate_steps)
        if served != str(run.model_version):
            raise DemoFailed(f"the sampler served pony_v7 version {served}, not the new version {run.model_version}")
        say(f"generate {len(outputs)} image(s) from pony_v7 version {served} -> {state / 'outputs'}")
        for reason in blocked:
            say(f"generate blocked by safety: {reason}")
        timings["generate_s"] = time.perf_counter() - t

        t = time.perf_counter()
        page = write_report(live, state / "report")
        timings["report_s"] = time.perf_counter() - t
    finally:
        if worker is not None:
            stop_worker(worker)
        stack.close()
    timings["total_s"] = time.perf_counter() - t0
    result = DemoResult(
        state_dir=state,
        samples=samples,
        export_dir=export_dir,
        report=page,
        outputs=outputs,
        blocked_outputs=blocked,
        counts=counts,
        blocked_pool=sorted(blocked_pool),
        selected=report.selected,
        run_id=run.run_id,
        model_version=int(run.model_version),
        timings=timings,
    )
    say("")
    say("done     everything is under " + str(state))
    say(f"         report    {page}")
    say(f"         manifest  {exported.manifest}")
    say(f"         images    {', '.join(str(p) for p in outputs)}")
    say(f"         catalog   {live.database_url}")
    say("         timings   " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return result


def cli_exit(settings: Settings, options: DemoOptions) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        run_demo(settings, options)
        return 0
    return 130
