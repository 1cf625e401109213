"""Evaluations in the catalog (table `evaluations`, one row per evaluation of a model version) and their files in
the blob store (`evaluations/<model>/v<version>/<id>/`: report.json, the Parquet tables, report.html)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select, update

from pony_common.blobs import BlobStore, open_uri
from pony_common.catalog import Catalog
from pony_common.catalog.models import EvaluationRow
from pony_common.errors import NotFound
from services.trainer.evaluation.results import Report

JSON_FILE = "report.json"
HTML_FILE = "report.html"


@dataclass(frozen=True)
class StoredEvaluation:
    evaluation_id: str
    model: str
    version: int | None
    summary: dict
    json_uri: str
    parquet_uri: str
    html_uri: str
    images: int
    seconds: float
    verdict: str
    reason: str
    created_at: str
    adapters: list

    @classmethod
    def from_row(cls, row: EvaluationRow) -> StoredEvaluation:
        return cls(
            evaluation_id=row.id,
            model=row.model,
            version=row.version,
            summary=dict(row.summary or {}),
            json_uri=row.json_uri,
            parquet_uri=row.parquet_uri,
            html_uri=row.html_uri,
            images=row.images,
            seconds=row.seconds,
            verdict=row.verdict,
            reason=row.reason,
            created_at=row.created_at.isoformat() if row.created_at else "",
            adapters=list(row.adapters or []),
        )


def folder(report: Report) -> str:
    version = "latest" if report.version is None else f"v{report.version}"
    return f"evaluations/{report.model}/{version}/{report.evaluation_id}"


class EvaluationStore:
    def __init__(self, catalog: Catalog, blobs: BlobStore) -> None:
        self.catalog = catalog
        self.blobs = blobs

    def save(self, report: Report, files: Mapping[str, bytes]) -> StoredEvaluation:
        """Writes `files` (name -> bytes; report.json among them) under the report's folder and the row."""
        base = folder(report)
        uris = {name: self.blobs.uri(self.blobs.put(f"{base}/{name}", data)) for name, data in files.items()}
        parquet = next((u for n, u in uris.items() if n.endswith(".parquet") and "judgement" in n), "")
        parquet = parquet or next((u for n, u in uris.items() if n.endswith(".parquet")), "")
        s = report.summary
        with self.catalog.session() as session:
            session.add(
                EvaluationRow(
                    id=report.evaluation_id,
                    model=report.model,
                    version=report.version,
                    adapters=[a.to_dict() for a in report.adapters],
                    images=report.cost.images,
                    seconds=report.cost.seconds,
                    follow_rate=s.follow_rate,
                    locking=s.locking,
                    summary=s.to_dict(),
                    json_uri=uris.get(JSON_FILE, ""),
                    parquet_uri=parquet,
                    html_uri=uris.get(HTML_FILE, ""),
                    verdict="",
                    reason="",
                )
            )
        return self.get(report.evaluation_id)

    def get(self, evaluation_id: str) -> StoredEvaluation:
        with self.catalog.session() as session:
            row = session.get(EvaluationRow, evaluation_id)
            if row is None:
                raise NotFound(f"evaluation {evaluation_id!r} does not exist")
            return StoredEvaluation.from_row(row)

    def latest(self, model: str, version: int | None = None, *, plain: bool = True) -> StoredEvaluation | None:
        """The newest evaluation of `model` (version None = any version). `plain`: of the model alone, without
        adapters (what a version is judged and compared on)."""
        with self.catalog.session() as session:
            query = select(EvaluationRow).where(EvaluationRow.model == model)
            if version is not None:
                query = query.where(EvaluationRow.version == version)
            rows = session.scalars(query.order_by(EvaluationRow.created_at.desc(), EvaluationRow.id.desc())).all()
            for row in rows:
                if not plain or not row.adapters:
                    return StoredEvaluation.from_row(row)
        return None

    def report(self, stored: StoredEvaluation) -> Report:
        import json

        return Report.from_dict(json.loads(open_uri(stored.json_uri)))

    def set_verdict(self, evaluation_id: str, verdict: str, reason: str) -> None:
        with self.catalog.session() as session:
            session.execute(
                update(EvaluationRow).where(EvaluationRow.id == evaluation_id).values(verdict=verdict, reason=reason)
            )
