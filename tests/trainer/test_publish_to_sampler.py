"""A finished local run is published to a running sampler (real tritonserver serving the tiny AuraFlow):
LoadVersion serves the trained pipeline as the next `pony_v7` version, linked to the run in the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from pony.v1 import sampler_pb2
from pony_common.catalog import catalog_for
from pony_common.catalog.models import ModelVersionRow
from services.sampler.client import SamplerClient
from services.trainer.local_run import demo_spec, train_locally
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton


def test_a_finished_run_becomes_the_samplers_served_version(sampler_stack: SamplerStack, manifest: Path) -> None:
    # The stack's catalog, address and token; the manifest lives in this test's own state folder: a trainer root.
    settings = sampler_stack.settings.replace(trainer_executor="local", trainer_roots=(str(manifest.parent),))
    with SamplerClient(settings, timeout=120) as client:
        # The next number of the family: above every version listed and every candidate number discarded.
        expected = sampler_stack.model.next_version("pony_v7")
        assert expected > max(v.version for v in client.list_versions(model="pony_v7"))
        run = train_locally(settings, demo_spec(manifest, steps=2), timeout_s=300)
        assert run.state == "Succeeded", run.reason
        assert run.model_version == expected
        versions = {v.version: v for v in client.list_versions(model="pony_v7")}
        served = versions[run.model_version]
        assert served.active and served.state == sampler_pb2.VERSION_STATE_READY
        resp = client.generate("a red square", seed=1, steps=2)
        assert resp.provenance.model_version == str(run.model_version)
    with catalog_for(settings.database_url).session() as s:
        rows = {r.version: r for r in s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == "pony_v7"))}
    assert rows[run.model_version].source_run_id == run.id and rows[run.model_version].active
