"""The style-adherence report as files: JSON (the whole `Report`) and Parquet (one row per image judgement with its
cell's columns, and one row per cell aggregate); the same report gives the same bytes, and each reads back."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from services.trainer.evaluation.results import (
    CellAggregate,
    GridCell,
    ImageJudgement,
    Report,
    StyleRequest,
)

JSON_NAME = "report.json"
JUDGEMENTS_NAME = "judgements.parquet"
AGGREGATES_NAME = "aggregates.parquet"

JUDGEMENT_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("content_id", pa.string()),
        ("content_text", pa.string()),
        ("style_id", pa.string()),
        ("style_kind", pa.string()),
        ("style_value", pa.string()),
        ("style_tags", pa.list_(pa.string())),
        ("style_cluster", pa.int64()),
        ("score_tags", pa.bool_()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("assigned_cluster", pa.int64()),
        ("requested_cluster", pa.int64()),
        ("cluster_distance", pa.float64()),
        ("followed", pa.bool_()),
        ("content_similarity", pa.float64()),
        ("aesthetic_score", pa.float64()),
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),
        ("seconds", pa.float64()),
    ]
)
_CELL_COLUMNS = ("content_id", "content_text", "score_tags", "seed", "prompt", "negative_prompt")
_JUDGEMENT_COLUMNS = (
    "assigned_cluster",
    "requested_cluster",
    "cluster_distance",
    "followed",
    "content_similarity",
    "aesthetic_score",
    "image_uri",
    "image_sha256",
    "seconds",
)

AGGREGATE_SCHEMA = pa.schema(
    [
        ("content_id", pa.string()),
        ("style_id", pa.string()),
        ("score_tags", pa.bool_()),
        ("n", pa.int64()),
        ("follow_rate", pa.float64()),
        ("mean_distance", pa.float64()),
        ("mean_content_similarity", pa.float64()),
        ("mean_aesthetic", pa.float64()),
        ("cell_ids", pa.list_(pa.string())),
    ]
)


class ReportFileError(ValueError):
    """A report file that does not hold what it should (wrong table, a judgement without its cell)."""


@dataclass(frozen=True)
class ReportFiles:
    """Where `write_report_files` put the report."""

    json: Path
    judgements: Path
    aggregates: Path


def report_json_bytes(report: Report) -> bytes:
    """The whole report as UTF-8 JSON (keys sorted, 2-space indent, trailing newline): the same report, the same
    bytes. Non-finite floats (a mean over no images) are written as null (strict JSON) and read back as None."""
    text = json.dumps(_finite(report.to_dict()), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def report_from_json(data: bytes | str) -> Report:
    return Report.from_dict(json.loads(data))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _metadata(report: Report, table: str) -> dict[bytes, bytes]:
    meta = {
        "table": table,
        "evaluation_id": report.evaluation_id,
        "model": report.model,
        "version": "" if report.version is None else str(report.version),
        "adapters": json.dumps([a.to_dict() for a in report.adapters], sort_keys=True),
        "created_at": report.created_at,
        "schema": str(report.schema),
    }
    return {f"pony.{k}".encode(): v.encode("utf-8") for k, v in meta.items()}


def judgements_table(report: Report) -> pa.Table:
    """One row per image judgement, in the report's order, with its grid cell's columns (content, style, score
    tags, seed, prompt). A judgement whose cell is not in the report raises ReportFileError."""
    cells = {c.cell_id: c for c in report.cells}
    columns: dict[str, list[Any]] = {name: [] for name in JUDGEMENT_SCHEMA.names}
    for j in report.judgements:
        cell = cells.get(j.cell_id)
        if cell is None:
            raise ReportFileError(f"judgement {j.cell_id!r} has no cell in the report")
        columns["cell_id"].append(j.cell_id)
        for name in _CELL_COLUMNS:
            columns[name].append(getattr(cell, name))
        columns["style_id"].append(cell.style.style_id)
        columns["style_kind"].append(cell.style.kind)
        columns["style_value"].append(cell.style.value)
        columns["style_tags"].append(list(cell.style.tags))
        columns["style_cluster"].append(cell.style.cluster)
        for name in _JUDGEMENT_COLUMNS:
            columns[name].append(getattr(j, name))
    table = pa.table(columns, schema=JUDGEMENT_SCHEMA)
    return table.replace_schema_metadata(_metadata(report, "judgements"))


def aggregates_table(report: Report) -> pa.Table:
    """One row per (content, style, score tags) aggregate over seeds, in the report's order."""
    columns: dict[str, list[Any]] = {name: [] for name in AGGREGATE_SCHEMA.names}
    for a in report.aggregates:
        for name in AGGREGATE_SCHEMA.names:
            value = getattr(a, name)
            columns[name].append(list(value) if name == "cell_ids" else value)
    table = pa.table(columns, schema=AGGREGATE_SCHEMA)
    return table.replace_schema_metadata(_metadata(report, "aggregates"))


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as Parquet (zstd; pyarrow writes no clock or path into the file): the same table gives the same
    bytes with the same pyarrow version."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True, store_schema=True)
    return sink.getvalue()


def read_table(source: bytes | str | Path, table: str) -> pa.Table:
    """A Parquet file written here; ReportFileError when it is another of our tables (or none of them)."""
    handle = pa.BufferReader(source) if isinstance(source, bytes) else str(source)
    result = pq.read_table(handle)
    found = (result.schema.metadata or {}).get(b"pony.table", b"").decode()
    if found != table:
        raise ReportFileError(f"expected the {table!r} table, the file holds {found or 'another table'!r}")
    return result


def judgements_from_table(table: pa.Table) -> tuple[tuple[GridCell, ...], tuple[ImageJudgement, ...]]:
    """The cells and judgements back from a judgements table (order kept)."""
    cells: list[GridCell] = []
    judgements: list[ImageJudgement] = []
    for row in table.to_pylist():
        style = StyleRequest(
            style_id=row["style_id"],
            kind=row["style_kind"],
            value=row["style_value"],
            tags=tuple(row["style_tags"] or ()),
            cluster=row["style_cluster"],
        )
        cells.append(GridCell(cell_id=row["cell_id"], style=style, **{name: row[name] for name in _CELL_COLUMNS}))
        judgements.append(ImageJudgement(cell_id=row["cell_id"], **{name: row[name] for name in _JUDGEMENT_COLUMNS}))
    return tuple(cells), tuple(judgements)


def aggregates_from_table(table: pa.Table) -> tuple[CellAggregate, ...]:
    return tuple(CellAggregate(**{**row, "cell_ids": tuple(row["cell_ids"] or ())}) for row in table.to_pylist())


def report_file_bytes(report: Report) -> dict[str, bytes]:
    """{file name: bytes} of the three files, for a store that takes bytes (the catalog's blob store)."""
    return {
        JSON_NAME: report_json_bytes(report),
        JUDGEMENTS_NAME: parquet_bytes(judgements_table(report)),
        AGGREGATES_NAME: parquet_bytes(aggregates_table(report)),
    }


def write_report_files(report: Report, directory: str | Path) -> ReportFiles:
    """Writes report.json, judgements.parquet and aggregates.parquet into `directory` (created if missing)."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    written = _write_all(target, report_file_bytes(report))
    return ReportFiles(
        json=written[JSON_NAME], judgements=written[JUDGEMENTS_NAME], aggregates=written[AGGREGATES_NAME]
    )


def _write_all(target: Path, files: Mapping[str, bytes]) -> dict[str, Path]:
    paths = {}
    for name, data in files.items():
        path = target / name
        tmp = target / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
        paths[name] = path
    return paths


def read_report_files(directory: str | Path) -> tuple[Report, pa.Table, pa.Table]:
    """The report (from JSON) and its judgements and aggregates tables, from a folder `write_report_files` wrote."""
    source = Path(directory)
    report = report_from_json((source / JSON_NAME).read_bytes())
    return (
        report,
        read_table(source / JUDGEMENTS_NAME, "judgements"),
        read_table(source / AGGREGATES_NAME, "aggregates"),
    )
