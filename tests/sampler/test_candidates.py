"""Candidate versions against the real stack (tritonserver serving the tiny AuraFlow as `pony_v7`): LoadVersion with
candidate=true loads a checkpoint beside the serving version (Triton model `pony_v7_candidate`) and moves no traffic;
only requests pinned to its number reach it; PromoteVersion makes it the serving version, DiscardVersion removes it
and leaves everything as it was. Each test promotes or discards what it loads, whatever happens, and the serving
weights stay the ones other tests expect (a promoted candidate here is the serving version's own pipeline)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from pony.v1 import sampler_pb2
from pony_common.access import runs_root
from pony_common.catalog import catalog_for
from pony_common.catalog.models import ModelVersionRow
from services.sampler.client import SamplerClient
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton

FAMILY = "pony_v7"


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack) -> Iterator[SamplerClient]:
    with SamplerClient(sampler_stack.settings, timeout=120) as c:
        yield c


@contextlib.contextmanager
def candidate_of(client: SamplerClient, uri: str, run_id: str) -> Iterator[sampler_pb2.ModelVersion]:
    """LoadVersion(candidate=true); the candidate is discarded on the way out unless the test promoted or discarded
    it."""
    loaded = client.load_version(uri, run_id, model=FAMILY, candidate=True, timeout=300)
    try:
        yield loaded
    finally:
        if any(v.candidate and v.version == loaded.version for v in client.list_versions(model=FAMILY)):
            client.discard_version(loaded.version, model=FAMILY, reason="test cleanup")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def serving(client: SamplerClient) -> sampler_pb2.ModelVersion:
    (active,) = [v for v in client.list_versions(model=FAMILY) if v.active]
    return active


def plain(versions: list[sampler_pb2.ModelVersion]) -> list[tuple[int, bool, bool]]:
    return [(v.version, v.active, v.candidate) for v in versions]


def catalog_rows(stack: SamplerStack) -> dict[int, ModelVersionRow]:
    with catalog_for(stack.settings.database_url).session() as s:
        return {r.version: r for r in s.scalars(select(ModelVersionRow).where(ModelVersionRow.name == FAMILY))}


def other_weights(stack: SamplerStack, name: str) -> Path:
    """A tiny AuraFlow with other random weights than the stack's, under the trainer's runs folder (a model root)."""
    from diffusers import AuraFlowPipeline

    from pony_common.models.auraflow import build_auraflow_components
    from services.stack.tiny import auraflow_tokenizer

    checkpoint = Path(runs_root(stack.settings)) / name / "final"
    if not (checkpoint / "model_index.json").is_file():
        AuraFlowPipeline(**build_auraflow_components(auraflow_tokenizer(), seed=23)).save_pretrained(checkpoint)
    return checkpoint


def test_a_candidate_serves_only_pinned_requests_and_discarding_it_leaves_everything_as_before(
    sampler_stack: SamplerStack, client: SamplerClient
) -> None:
    before = client.list_versions(model=FAMILY)
    active = serving(client)
    old = client.generate("a pony", seed=3, steps=2)
    assert old.provenance.model_version == str(active.version)
    checkpoint = other_weights(sampler_stack, "candidate-other")

    with candidate_of(client, str(checkpoint), "run-cand") as cand:
        assert cand.candidate and not cand.active and cand.state == sampler_pb2.VERSION_STATE_READY
        assert cand.version > max(v.version for v in before)
        # Unpinned traffic stays on the serving version: same version, same pixels.
        unpinned = client.generate("a pony", seed=3, steps=2)
        assert unpinned.provenance.model_version == str(active.version)
        assert np.array_equal(pixels(unpinned.images[0].png), pixels(old.images[0].png))
        # A request pinned to the candidate gets the candidate's weights.
        pinned = client.generate("a pony", seed=3, steps=2, model_version=cand.version)
        assert pinned.provenance.model_version == str(cand.version)
        assert not np.array_equal(pixels(pinned.images[0].png), pixels(old.images[0].png))
        # Visible as a candidate, not active, in ListVersions and ListModels; its catalog row is not active.
        listed = {v.version: v for v in client.list_versions(model=FAMILY)}
        assert listed[cand.version].candidate and not listed[cand.version].active
        assert serving(client).version == active.version
        (family,) = [m for m in client.list_models() if m.name == FAMILY]
        assert any(v.candidate and v.version == cand.version for v in family.versions)
        rows = catalog_rows(sampler_stack)
        assert not rows[cand.version].active and rows[cand.version].source_run_id == "run-cand"
        assert rows[active.version].active
        # One candidate per family at a time.
        with pytest.raises(grpc.RpcError) as err:
            client.load_version(str(checkpoint), model=FAMILY, candidate=True, timeout=300)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"candidate version {cand.version}" in err.value.details()

        discarded = client.discard_version(cand.version, model=FAMILY, reason="worse than the last one")
        assert discarded.version == cand.version and discarded.candidate

    # Everything as before: the versions, the serving version and its pixels; the candidate is gone.
    assert plain(client.list_versions(model=FAMILY)) == plain(before)
    after = client.generate("a pony", seed=3, steps=2)
    assert after.provenance.model_version == str(active.version)
    assert np.array_equal(pixels(after.images[0].png), pixels(old.images[0].png))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("a pony", seed=3, steps=2, model_version=cand.version)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    rows = catalog_rows(sampler_stack)
    assert not rows[cand.version].active and rows[active.version].active
    # The discarded number is never served nor reused, also after a restart (the repository keeps it).
    assert sampler_stack.model.next_version(FAMILY) > cand.version
    assert sampler_stack.model.candidates[FAMILY].discarded()[cand.version] == "worse than the last one"
    with pytest.raises(grpc.RpcError) as err:
        client.discard_version(cand.version, model=FAMILY)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_promoting_a_candidate_moves_unpinned_traffic_to_it(sampler_stack: SamplerStack, client: SamplerClient) -> None:
    active = serving(client)
    # The serving version's own pipeline as the candidate: the serving weights end up the same for other tests.
    with candidate_of(client, active.uri, "run-promote") as cand:
        pinned = client.generate("a pony", seed=5, steps=2, model_version=cand.version)
        assert pinned.provenance.model_version == str(cand.version)
        assert client.generate("a pony", seed=5, steps=2).provenance.model_version == str(active.version)

        promoted = client.promote_version(cand.version, model=FAMILY)
        assert promoted.version == cand.version and promoted.active and not promoted.candidate

    unpinned = client.generate("a pony", seed=5, steps=2)
    assert unpinned.provenance.model_version == str(cand.version)
    assert np.array_equal(pixels(unpinned.images[0].png), pixels(pinned.images[0].png))
    versions = {v.version: v for v in client.list_versions(model=FAMILY)}
    assert versions[cand.version].active and not versions[cand.version].candidate
    assert not any(v.candidate for v in versions.values())
    assert not versions[active.version].active
    rows = catalog_rows(sampler_stack)
    assert rows[cand.version].active and not rows[active.version].active
    assert rows[cand.version].source_run_id == "run-promote"
