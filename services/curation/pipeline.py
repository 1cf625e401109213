"""The whole curation run in one call (for the demo): ingest and wait, select, export, report.

The four services must be reachable at the settings' addresses. Blocking: from asyncio code that hosts the
services on its own loop, call it with `await asyncio.to_thread(run_curation, ...)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pony_common.config import Settings
from pony_common.workers import running_workers
from services.curation.categories import DEFAULT_MIX
from services.curation.export import ExportSummary, export_selection
from services.curation.ingest import IngestSummary, ingest_source
from services.curation.selection import SelectionReport, select_images

log = logging.getLogger(__name__)


@dataclass
class CurationRun:
    ingest: IngestSummary
    selection: SelectionReport
    export: ExportSummary
    report: Path


def run_curation(
    settings: Settings,
    source: str | Path,
    out_dir: str | Path,
    *,
    total: int = 40,
    mix: Mapping[str, float] | None = None,
    min_score: float | None = None,
    name: str = "default",
    workers: int = 1,
    timeout_s: float = 1800,
    progress: bool = True,
) -> CurationRun:
    """Ingests `source` and waits for the workflow, selects `total` images by `mix` (default: the V7 mix),
    exports `out_dir/dataset/manifest.parquet` (+ WebDataset shards) and writes `out_dir/report/index.html`.

    With `workers` > 0 it runs that many `ponyctl worker` subprocesses for the ingest (stopped afterwards);
    with 0 it relies on workers already consuming the curation queues."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if workers > 0:
        with running_workers(settings, workers, log_path=out / "workers.log"):
            summary = ingest_source(settings, str(source), wait=True, progress=progress, timeout_s=timeout_s)
    else:
        summary = ingest_source(settings, str(source), wait=True, progress=progress, timeout_s=timeout_s)
    selection = select_images(settings, total, dict(mix or DEFAULT_MIX), min_score=min_score, name=name)
    exported = export_selection(settings, out / "dataset", name=name, webdataset=True)
    from services.curation.report import write_report

    report = write_report(settings, out / "report", selection=name)
    log.info("curation run done", extra={"selected": selection.selected, "report": str(report)})
    return CurationRun(summary, selection, exported, report)
