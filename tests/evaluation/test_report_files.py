"""The report's JSON and Parquet files: the same report gives the same bytes, every file reads back to what was
written, one Parquet row per image judgement with its cell's columns and one per cell aggregate."""

from __future__ import annotations

import dataclasses
import json

import pyarrow.parquet as pq
import pytest

from services.trainer.evaluation.report_files import (
    AGGREGATES_NAME,
    JSON_NAME,
    JUDGEMENTS_NAME,
    ReportFileError,
    aggregates_from_table,
    aggregates_table,
    judgements_from_table,
    judgements_table,
    parquet_bytes,
    read_report_files,
    read_table,
    report_file_bytes,
    report_from_json,
    report_json_bytes,
    write_report_files,
)
from services.trainer.evaluation.results import ContentPrompt, Report
from tests.evaluation.judged import FOLLOWED, make_report

HOSTILE = '<script>alert("x")</script> “portrait” ✓ \\ \n tab\t'


@pytest.fixture(scope="module")
def report() -> Report:
    """The constructed report, with a hostile, non-ASCII content text and image URIs / settings filled in."""
    base = make_report(FOLLOWED, version=3)
    contents = tuple(dataclasses.replace(c, text=HOSTILE) if c.content_id == "portrait" else c for c in base.contents)
    cells = tuple(
        dataclasses.replace(c, content_text=HOSTILE, prompt=HOSTILE) if c.content_id == "portrait" else c
        for c in base.cells
    )
    judgements = tuple(
        dataclasses.replace(j, image_uri=f"file:///blobs/{i}.png", image_sha256=f"{i:064x}", seconds=0.25 * i)
        for i, j in enumerate(base.judgements)
    )
    return dataclasses.replace(
        base, contents=contents, cells=cells, judgements=judgements, settings={"steps": 4, "seeds": [1000, 1001]}
    )


def test_json_reads_back_to_the_same_report(report):
    data = report_json_bytes(report)
    assert report_from_json(data) == report
    assert report_from_json(data.decode("utf-8")) == report
    assert HOSTILE in json.loads(data)["contents"][0]["text"]


def test_same_report_gives_the_same_bytes(report):
    first = report_file_bytes(report)
    again = report_file_bytes(report_from_json(first[JSON_NAME]))
    assert set(first) == {JSON_NAME, JUDGEMENTS_NAME, AGGREGATES_NAME}
    assert first == again


def test_judgements_table_has_one_row_per_judgement_with_its_cell(report):
    table = judgements_table(report)
    assert table.num_rows == len(report.judgements)
    cells = {c.cell_id: c for c in report.cells}
    for row in table.to_pylist():
        cell = cells[row["cell_id"]]
        assert (row["content_id"], row["style_id"], row["score_tags"], row["seed"]) == (
            cell.content_id,
            cell.style.style_id,
            cell.score_tags,
            cell.seed,
        )
        assert row["prompt"] == cell.prompt and row["style_tags"] == list(cell.style.tags)
        assert row["followed"] == report.judgement(row["cell_id"]).followed
    misses = [r for r in table.to_pylist() if r["content_id"] == "portrait" and r["style_id"] == "cluster_0"]
    assert [r["followed"] for r in misses] == [False] * 4  # FOLLOWED: portrait never follows cluster 0


def test_parquet_reads_back_to_the_cells_judgements_and_aggregates(report):
    judged = read_table(parquet_bytes(judgements_table(report)), "judgements")
    cells, judgements = judgements_from_table(judged)
    assert judgements == report.judgements
    assert cells == report.cells
    aggs = read_table(parquet_bytes(aggregates_table(report)), "aggregates")
    assert aggs.num_rows == len(report.aggregates) == 3 * 2 * 2  # content x style x score tags
    assert aggregates_from_table(aggs) == report.aggregates
    meta = judged.schema.metadata
    assert meta[b"pony.evaluation_id"] == b"eval-3" and meta[b"pony.model"] == b"pony_v7"


def test_files_written_to_a_folder_read_back(report, tmp_path):
    files = write_report_files(report, tmp_path / "eval")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == sorted(
        [JSON_NAME, JUDGEMENTS_NAME, AGGREGATES_NAME]
    )
    back, judged, aggs = read_report_files(tmp_path / "eval")
    assert back == report
    assert judged.num_rows == len(report.judgements) and aggs.num_rows == len(report.aggregates)
    assert pq.read_table(files.judgements).column("cell_id").to_pylist() == [j.cell_id for j in report.judgements]
    again = write_report_files(report, tmp_path / "eval")  # rewriting is harmless and byte-identical
    assert again.json.read_bytes() == report_json_bytes(report)


def test_reading_the_wrong_table_says_which(report):
    data = parquet_bytes(aggregates_table(report))
    with pytest.raises(ReportFileError, match=r"expected the 'judgements' table.*'aggregates'"):
        read_table(data, "judgements")


def test_a_judgement_without_its_cell_is_refused(report):
    broken = dataclasses.replace(report, cells=report.cells[1:])
    with pytest.raises(ReportFileError, match=report.cells[0].cell_id.replace("|", r"\|")):
        judgements_table(broken)


def test_non_finite_figures_become_null_in_strict_json(report):
    empty = dataclasses.replace(report.summary, follow_rate=float("nan"))
    data = report_json_bytes(dataclasses.replace(report, summary=empty))

    def refuse(token: str) -> float:
        raise AssertionError(f"non-standard JSON token {token}")

    parsed = json.loads(data, parse_constant=refuse)
    assert parsed["summary"]["follow_rate"] is None
    back = report_from_json(data)
    assert back.summary.follow_rate is None  # a figure over no images: "no value", not a number
    assert isinstance(back.contents[0], ContentPrompt)
