"""One style-adherence evaluation end to end: the grid -> the sampler (low-priority jobs) -> the judges -> the
figures (locking.py) -> the report, stored with the model version (catalog row + files in the blob store), and,
when asked, compared with another version's stored report."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pony_common.blobs import BlobStore
from pony_common.catalog import Catalog, catalog_for
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, FailedPrecondition, InvalidArgument, NotFound
from services.trainer.evaluation import locking
from services.trainer.evaluation.generation import Generated, SamplerGenerator
from services.trainer.evaluation.grid import DEFAULT_CONTENTS, GridSpec, build_grid, pick_clusters
from services.trainer.evaluation.judges import Judges, RawJudgement
from services.trainer.evaluation.results import (
    Adapter,
    Comparison,
    Cost,
    GridCell,
    ImageJudgement,
    Report,
)
from services.trainer.evaluation.store import HTML_FILE, EvaluationStore, StoredEvaluation

log = logging.getLogger(__name__)

UNKNOWN_DISTANCE = -1.0  # the requested cluster is not among those the style tagger lists (e.g. flagged)


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate; 0 / empty = the settings' defaults (PONY_EVAL_SEEDS, PONY_EVAL_CLUSTERS)."""

    model: str = ""
    version: int = 0  # 0 = the version serving now
    adapters: tuple[Adapter, ...] = ()
    seeds: int = 0
    clusters: int = 0
    contents: tuple[str, ...] = ()  # content ids of the default grid; empty = all
    steps: int = 0
    size: int = 0
    direct: bool = False  # Generate calls instead of low-priority jobs
    compare_to_version: int = 0
    base_seed: int = 1000
    lock_threshold: float = locking.DEFAULT_LOCK_THRESHOLD
    sources: tuple[str, ...] | None = None  # None = the grid's defaults
    words: tuple[str, ...] | None = None

    def check(self) -> None:
        if self.seeds < 0 or self.seeds > 64:
            raise InvalidArgument("seeds", f"must be 0..64 (0 = PONY_EVAL_SEEDS), got {self.seeds}")
        if self.clusters < 0 or self.clusters > 100:
            raise InvalidArgument("clusters", f"must be 0..100, got {self.clusters}")
        if self.version < 0:
            raise InvalidArgument("version", "must be >= 0")
        known = {c.content_id for c in DEFAULT_CONTENTS}
        for i, cid in enumerate(self.contents):
            if cid not in known:
                raise InvalidArgument(
                    f"contents[{i}]", f"unknown content {cid!r}; use one of {', '.join(sorted(known))}"
                )
        for i, a in enumerate(self.adapters):
            if not a.name:
                raise InvalidArgument(f"adapters[{i}].name", "is required")
            if not math.isfinite(a.weight) or not -4.0 <= a.weight <= 4.0:
                raise InvalidArgument(f"adapters[{i}].weight", f"must be -4..4, got {a.weight}")
        if self.size and (self.size % 16 or not 64 <= self.size <= 4096):
            raise InvalidArgument("size", f"must be a multiple of 16 in 64..4096, got {self.size}")
        if self.steps < 0 or self.steps > 200:
            raise InvalidArgument("steps", f"must be 0..200, got {self.steps}")


@dataclass
class EvalOutcome:
    report: Report
    stored: StoredEvaluation
    comparison: Comparison | None = None
    images: dict[str, bytes] = field(default_factory=dict)


def finalize(
    cells: Sequence[GridCell], raw: Sequence[RawJudgement], generated: Sequence[Generated]
) -> list[ImageJudgement]:
    """Resolves each style request's cluster (locking.resolve_style_clusters) and makes the judgements."""
    targets = locking.resolve_style_clusters(cells, {r.cell_id: r.assigned_cluster for r in raw})
    by_cell = {c.cell_id: c for c in cells}
    gen = {g.cell_id: g for g in generated}
    out = []
    for r in raw:
        cell = by_cell[r.cell_id]
        target = targets.get(cell.style.style_id)
        distance = r.distance_to(target)
        g = gen[r.cell_id]
        out.append(
            ImageJudgement(
                cell_id=r.cell_id,
                assigned_cluster=r.assigned_cluster,
                requested_cluster=target,
                cluster_distance=distance if math.isfinite(distance) else UNKNOWN_DISTANCE,
                followed=target is not None and r.assigned_cluster == target,
                content_similarity=r.content_similarity,
                aesthetic_score=r.aesthetic_score,
                image_uri=g.uri,
                image_sha256=g.image_id,
                seconds=g.seconds,
            )
        )
    return out


class Evaluator:
    """Runs evaluations with one settings object; the clients and stores are injectable (tests pass theirs)."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog | None = None,
        judges: Judges | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog or catalog_for(settings.database_url)
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.store = EvaluationStore(self.catalog, self.blobs)
        self._judges = judges

    @property
    def judges(self) -> Judges:
        if self._judges is None:
            self._judges = Judges(self.settings)
        return self._judges

    def grid_spec(self, request: EvalRequest) -> GridSpec:
        clusters = request.clusters or self.settings.eval_clusters
        available = self.judges.clusters()
        if not available:
            raise FailedPrecondition("the style tagger has no tagged style clusters: fit a cluster set first")
        picked = pick_clusters(available, clusters)
        contents = DEFAULT_CONTENTS
        if request.contents:
            contents = tuple(c for c in DEFAULT_CONTENTS if c.content_id in set(request.contents))
        spec = GridSpec(
            contents=contents,
            clusters=picked,
            seeds=request.seeds or self.settings.eval_seeds,
            base_seed=request.base_seed,
        )
        if request.sources is not None:
            spec = GridSpec(**{**spec.__dict__, "sources": request.sources})
        if request.words is not None:
            spec = GridSpec(**{**spec.__dict__, "words": request.words})
        return spec

    def run(
        self,
        request: EvalRequest,
        *,
        generator: SamplerGenerator | None = None,
        on_image: Callable[[Generated], None] | None = None,
    ) -> EvalOutcome:
        request.check()
        started = time.monotonic()
        model = request.model or self.settings.trainer.publish_model
        evaluation_id = f"eval-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:8]}"
        spec = self.grid_spec(request)
        cells = build_grid(spec)
        generator = generator or SamplerGenerator(
            self.settings,
            model,
            request.version,
            request.adapters,
            steps=request.steps,
            size=request.size,
            direct=request.direct,
            blobs=self.blobs,
        )
        version = request.version or generator.serving_version()
        gen_start = time.monotonic()
        generated = generator.generate(cells, on_image)
        gen_seconds = time.monotonic() - gen_start
        failed = [g for g in generated if g.error and not g.error.startswith("blocked")]
        if failed:
            raise DependencyUnavailable(f"{len(failed)} of {len(generated)} images failed: {failed[0].error}")
        served = {g.model_version for g in generated if g.model_version is not None}
        if request.version and served and served != {request.version}:
            raise FailedPrecondition(
                f"asked for {model} version {request.version}, the sampler served {sorted(served)}"
            )
        if not request.version and len(served) == 1:
            version = served.pop()
        made = [g for g in generated if g.png]
        by_cell = {c.cell_id: c for c in cells}
        judge_start = time.monotonic()
        raw = self.judges.judge([(g.cell_id, g.png, by_cell[g.cell_id].content_text) for g in made])
        judge_seconds = time.monotonic() - judge_start
        judgements = finalize(cells, raw, generated)
        styles = spec.styles()
        lock = locking.content_locking(spec.contents, cells, judgements, request.lock_threshold)
        rates = locking.style_follow_rates(styles, cells, judgements)
        effects = locking.score_tag_effects(spec.contents, cells, judgements)
        summary = locking.summarize(model, version, request.adapters, judgements, lock, rates, effects)
        settings_used = {
            **spec.to_dict(),
            "steps": request.steps,
            "size": request.size,
            "generation": "generate" if request.direct else "jobs (priority 0)",
            "blocked": len(generated) - len(made),
        }
        report = Report(
            evaluation_id=evaluation_id,
            model=model,
            version=version,
            adapters=request.adapters,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            contents=spec.contents,
            styles=styles,
            cells=cells,
            judgements=tuple(judgements),
            aggregates=locking.aggregate_cells(cells, judgements),
            locking=lock,
            style_rates=rates,
            score_tag_effects=effects,
            summary=summary,
            cost=Cost(
                images=len(generated),
                seconds=time.monotonic() - started,
                generate_seconds=gen_seconds,
                judge_seconds=judge_seconds,
            ),
            lock_threshold=request.lock_threshold,
            settings=settings_used,
        )
        comparison = None
        if request.compare_to_version:
            comparison = self.compare_with(report, request.compare_to_version)
        images = {g.cell_id: g.png for g in made}
        stored = self.store.save(report, self.files(report, images, comparison))
        log.info(
            "style-adherence evaluation stored",
            extra={"evaluation_id": evaluation_id, "model": model, "version": version, "images": len(generated)},
        )
        return EvalOutcome(report, stored, comparison, images)

    def compare_with(self, report: Report, base_version: int, threshold: float | None = None) -> Comparison:
        base = self.store.latest(report.model, base_version)
        if base is None:
            raise NotFound(f"no stored evaluation of {report.model} version {base_version} to compare with")
        limit = self.settings.eval_max_locking_regression if threshold is None else threshold
        return locking.compare(self.store.report(base), report, limit or locking.DEFAULT_COMPARE_THRESHOLD)

    @staticmethod
    def files(report: Report, images: dict[str, bytes], comparison: Comparison | None) -> dict[str, bytes]:
        """report.json + the Parquet tables (report_files.py) and the HTML page (report_html.py)."""
        from services.trainer.evaluation.report_files import report_file_bytes

        files = dict(report_file_bytes(report))
        try:
            from services.trainer.evaluation.report_html import render_html

            files[HTML_FILE] = render_html(report, images, comparison).encode("utf-8")
        except ImportError:  # the page is optional: the JSON and Parquet are the record
            log.warning("report_html not available: no HTML page")
        return files
