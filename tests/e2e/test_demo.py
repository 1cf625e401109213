"""The main job end to end, smaller: `run_demo` on the embedded default (SQLite catalog and broker, every service
on localhost, a real tritonserver), then a second run that reuses what the first built."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from sqlalchemy import func, select

from pony_common.catalog import catalog_for
from pony_common.catalog.models import ImageRow, ModelVersionRow, SafetyDecisionRow
from pony_common.config import Settings
from services.sampler.pnginfo import read_parameters
from services.stack.demo import DemoOptions, run_demo
from services.trainer.store import TrainingRunRow


@pytest.fixture
def demo_settings(tmp_path: Path, tiny_models: Path) -> Settings:
    return Settings.from_env({}, state_dir=str(tmp_path / "demo"), models_dir=str(tiny_models))


def test_demo_runs_the_whole_loop_and_a_second_run_reuses_it(
    demo_settings: Settings, tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tiny_models / ".pony-tiny-models").write_text("built by the test session\n")
    options = DemoOptions(free_ports=True, per_category=2, select_total=8, train_steps=2, timeout_s=600)
    first = run_demo(demo_settings, options)
    out = capsys.readouterr().out

    catalog = catalog_for(demo_settings.database_url)
    with catalog.session() as s:
        statuses = dict(s.execute(select(ImageRow.status, func.count()).group_by(ImageRow.status)).all())
        blocked = s.scalar(select(func.count()).where(SafetyDecisionRow.decision == "block"))
        runs = s.scalars(select(TrainingRunRow)).all()
        versions = s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == "pony_v7")).all()
    # The sample pool's corrupt files fail with reasons; everything else is curated.
    assert statuses.get("failed") == 3
    assert statuses.get("done", 0) >= 12
    assert "failed" in out and "truncated" in out
    # Safety blocked the pool's images that carry blocked tags.
    assert blocked >= 1 and len(first.blocked_pool) == blocked
    # Select -> export: the manifest has the selection with captions and V7 prompts.
    manifest = pq.read_table(first.export_dir / "manifest.parquet").to_pylist()
    assert len(manifest) == first.selected == 8
    assert all(row["prompt"] and json.loads(row["captions"]) for row in manifest)
    # Training succeeded and its checkpoint is the version the sampler served.
    assert [r.state for r in runs] == ["Succeeded"]
    assert first.model_version == max(v.version for v in versions) >= 2
    assert f"published as pony_v7 version {first.model_version}" in out
    assert first.outputs, "no image came back from the sampler"
    for path in first.outputs:
        params = read_parameters(path.read_bytes())
        assert params, f"{path} carries no generation parameters"
        Image.open(io.BytesIO(path.read_bytes())).verify()
    assert first.report.exists() and "<html" in first.report.read_text().lower()

    second = run_demo(demo_settings, options)
    out = capsys.readouterr().out
    assert "reusing tiny models" in out and "reusing the sample pool" in out
    assert "(0 new), 0 curated in this run" in out
    assert second.model_version == first.model_version + 1
    with catalog.session() as s:
        assert s.scalar(select(func.count()).select_from(ImageRow)) == sum(statuses.values())
