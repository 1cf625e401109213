"""The curation workflow (by batches) end to end on the real services, the real Redis broker and a `ponyctl worker`
subprocess: every image processed exactly once, corrupt files fail with their reason while the rest go on, a
re-ingest adds nothing, and selection, export and report work on what the workflow produced."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import EmbeddingRow, ImageRow, SafetyDecisionRow
from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.images import image_id
from services.curation.export import export_selection
from services.curation.ingest import ingest_source
from services.curation.report import write_report
from services.curation.samples import write_sample_pool
from services.curation.selection import select_images
from services.curation.status import curation_status
from services.curation.styles import assign_styles
from tests.curation.ledger_checks import assert_processed_exactly_once, stages


def test_ingest_curates_each_image_once_fails_corrupt_files_and_reingest_adds_nothing(
    workflow_settings: Settings, workers, tmp_path: Path
) -> None:
    settings = workflow_settings
    pool = write_sample_pool(
        tmp_path / "pool", per_category=1, near_duplicates=1, corrupt=2, blocked=1, size=48, seed=11
    )
    workers(settings)
    summary = ingest_source(settings, str(pool.root), wait=True, progress=False, timeout_s=400)
    # 6 originals + 1 near-duplicate (the exact duplicate shares its original's id) + 2 corrupt files.
    assert len(summary.ids) == 9 and summary.new == 9
    assert summary.finished == {"done": 7}, summary.finished
    catalog = catalog_for(settings.database_url)
    with catalog.session() as s:
        rows = {r.id: r for r in s.scalars(select(ImageRow).where(ImageRow.id.in_(summary.ids)))}
    images = {rel: rows[image_id((pool.root / rel).read_bytes())] for rel in pool.images + pool.corrupt}
    images |= {rel: rows[image_id((pool.root / rel).read_bytes())] for _, rel in pool.near_duplicates}
    done = [r.id for r in rows.values() if r.status == "done"]
    assert len(done) == 7
    assert_processed_exactly_once(settings, done)
    # One CLIP embedding per image (the scorer's pass, shared by style, safety and clustering): before the first
    # cluster set the style stage keeps only the palette, and the fit tags the stored embeddings.
    with catalog.session() as s:
        kinds = s.execute(
            select(EmbeddingRow.kind, func.count()).where(EmbeddingRow.image_id.in_(done)).group_by(EmbeddingRow.kind)
        ).all()
    assert dict(kinds) == {"clip": 7}

    # Corrupt files: failed with their reason, never sent through the workflow.
    for rel in pool.corrupt[:2]:
        row = images[rel]
        assert row.status == "failed" and row.error.startswith("invalid_image: ")
    assert stages(settings, [images[rel].id for rel in pool.corrupt[:2]]) == []

    # Safety blocked the image tagged for it; the rest are allowed.
    with catalog.session() as s:
        decisions = {
            d.image_id: d for d in s.scalars(select(SafetyDecisionRow).where(SafetyDecisionRow.image_id.in_(done)))
        }
    blocked = images[pool.blocked[0]].id
    assert decisions[blocked].decision == "block"
    assert any(r["rule_id"] == "tags.blocked" for r in decisions[blocked].reasons)
    # The near-duplicate and its original are one group with one eligible member.
    original, copy = (images[p] for p in pool.near_duplicates[0])
    with catalog.session() as s:
        pair = [s.get(ImageRow, original.id), s.get(ImageRow, copy.id)]
    assert pair[0].dup_group == pair[1].dup_group is not None
    assert sorted(r.is_duplicate for r in pair) == [False, True]

    # A re-ingest adds no image, no blob and no work.
    again = ingest_source(settings, str(pool.root), wait=True, progress=False, timeout_s=60)
    assert again.new == 0 and again.submitted == []
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.id.in_(summary.ids))) == 9
    assert_processed_exactly_once(settings, done)

    status = curation_status(catalog)
    by_stage = {r.stage: r for r in status.stages}
    assert by_stage["persist"].done >= 7 and by_stage["decode"].failed >= 2
    assert any(f.stage == "decode" and "invalid_image" in f.reason for f in status.failures)

    # Styles, selection, export and report on what the workflow produced.
    # The first batch fitted the style clusters and tagged every processed image.
    assert summary.styles["fitted"] is True and summary.styles["tagged"] == 7
    assert assign_styles(settings).tagged == 0
    report = select_images(settings, 4, {"pony": 0.5, "anime": 0.5, "western": 1.0}, name="wf")
    assert blocked not in report.image_ids and report.selected >= 1
    out = export_selection(settings, tmp_path / "export", name="wf", webdataset=True)
    table = pq.read_table(out.manifest).to_pylist()
    assert [r["image_id"] for r in table] == report.image_ids
    for row in table:
        image = tmp_path / "export" / row["image_uri"]  # relative to the export folder
        assert image.is_file() and image.parent == tmp_path / "export" / "images"
        captions = json.loads(row["captions"])
        assert set(captions) == {"short", "medium", "long", "style"}
        assert row["special_tags"][0].startswith("score_") and any(t.startswith("rating_") for t in row["special_tags"])
        assert row["prompt"].startswith(", ".join(row["special_tags"]))
        # The palette the first batch stored before any cluster set existed came through the fit.
        assert any(t.startswith("palette_") for t in row["special_tags"]), row["special_tags"]
    assert len(out.shards) == 1
    # The trainer reads it as written.
    from services.trainer.training.manifest import read_manifest

    items = read_manifest(out.manifest)
    assert [i.image_id for i in items] == report.image_ids and all(i.special_tags and i.prompt for i in items)
    page = write_report(settings, tmp_path / "report", selection="wf")
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") >= 7 and "<svg" in html and "block" in html


def test_cli_ingests_a_manifest_and_reports_status_export_and_report(
    workflow_settings: Settings, workers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    settings = workflow_settings
    pool = write_sample_pool(
        tmp_path / "pool",
        per_category=1,
        near_duplicates=0,
        corrupt=0,
        blocked=0,
        size=48,
        seed=14,
        categories=("furry",),
    )
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps(
            {
                "uri": str(pool.root / pool.images[0]),
                "tags": "fox, anthro",
                "category": "furry",
                "characters": ["rusty tailwind"],
                "artist": "pawz",
                "source_site": "e621",
            }
        )
        + "\n"
    )
    workers(settings)
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert main(["ingest", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert main(["ingest", str(manifest), "--no-progress", "--timeout", "300"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert out["new"] == 1 and out["finished"] == {"done": 1}
    digest = image_id((pool.root / pool.images[0]).read_bytes())
    with catalog_for(settings.database_url).session() as s:
        row = s.get(ImageRow, digest)
        assert s.get(SafetyDecisionRow, digest) is not None
    assert row.status == "done"
    assert (row.category, row.characters, row.artist, row.source_site) == ("furry", ["rusty tailwind"], "pawz", "e621")
    # Status, report and export through the CLI as well.
    assert main(["status"]) == 0
    assert "persist" in capsys.readouterr().out
    assert main(["select", "--total", "1", "--mix", "furry=1", "--name", "cli"]) == 0
    assert main(["export", str(tmp_path / "out"), "--name", "cli", "--webdataset"]) == 0
    assert (tmp_path / "out" / "manifest.parquet").is_file() and list((tmp_path / "out" / "shards").glob("*.tar"))
    assert main(["report", str(tmp_path / "report"), "--name", "cli"]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
