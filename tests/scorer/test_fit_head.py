"""FitHead on synthetic preferences: it learns a hidden preference direction, and the running scorer swaps heads."""

from __future__ import annotations

import datetime as dt
import hashlib

import grpc
import numpy as np
import pytest
import torch
from sqlalchemy import select

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.catalog.db import catalog_for
from pony_common.catalog.models import AestheticScoreRow, EmbeddingRow, ImageRow
from pony_common.config import Settings
from pony_common.testing import serve
from services.scorer.app import create_service
from services.scorer.fit import FitConfig, FitData, fit_head, quantile_calibration
from services.scorer.store import AestheticHeadRow, ComparisonRow

DIM = 64  # the tiny CLIP's projection width


def unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def judgements(u: np.ndarray, pairs: int, rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """Noisy judgements that follow the hidden utility u: the better image wins most of the time, not always."""
    judged = []
    for _ in range(pairs):
        i, j = rng.choice(len(u), 2, replace=False)
        p_i = 1 / (1 + np.exp(-4 * (u[i] - u[j])))
        a, b = sorted((i, j), key=lambda k: ids[k])
        winner = i if rng.random() < p_i else j
        judged.append((a, b, "a" if winner == a else "b"))
    return judged


ids = [hashlib.sha256(f"pref-{i}".encode()).hexdigest() for i in range(400)]


def fill_catalog(settings: Settings, x: np.ndarray, judged: list[tuple[int, int, str]]) -> None:
    catalog = catalog_for(settings.database_url)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with catalog.session() as s:
        for i in range(len(x)):
            s.add(ImageRow(id=ids[i], blob_key=f"images/{ids[i]}.png"))
        s.flush()
        for i in range(len(x)):
            s.add(
                EmbeddingRow(
                    image_id=ids[i],
                    kind="clip",
                    dim=DIM,
                    vector=x[i].astype("<f4").tobytes(),
                    model="t",
                    model_version="t",
                )
            )
        for i in range(0, len(x), 8):  # a few images carry a stored score too
            s.add(
                AestheticScoreRow(
                    image_id=ids[i],
                    raw=0.5,
                    score=0.5,
                    score_tag="score_5",
                    model="t",
                    model_version="t",
                    head_version="h",
                )
            )
        for n, (a, b, outcome) in enumerate(judged):
            s.add(
                ComparisonRow(
                    rater=f"rater-{n}", image_a=ids[a], image_b=ids[b], outcome=outcome,
                    created_at=start + dt.timedelta(seconds=n),
                )
            )  # fmt: skip


def score_embeddings(stub: scorer_pb2_grpc.ScorerStub, x: np.ndarray) -> scorer_pb2.ScoreEmbeddingsResponse:
    request = scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=v.tolist()) for v in x])
    return stub.ScoreEmbeddings(request, timeout=30)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_settings(request: pytest.FixtureRequest, model_settings: Settings) -> Settings:
    """The tiny models with the catalog on SQLite (embedded default) or PostgreSQL."""
    if request.param == "sqlite":
        return model_settings
    return model_settings.replace(database_url=request.getfixturevalue("postgres_url"))


def test_fit_head_learns_preferences_and_the_running_scorer_hot_swaps_to_it(catalog_settings: Settings) -> None:
    model_settings = catalog_settings
    rng = np.random.default_rng(0)
    w = rng.normal(size=DIM).astype(np.float32)  # the hidden preference direction
    x = unit_vectors(160, rng)
    fill_catalog(model_settings, x, judgements(x @ w, 900, rng))
    probe_x = unit_vectors(60, rng)  # images the fit never saw
    probe_u = probe_x @ w

    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = scorer_pb2_grpc.ScorerStub(ch)
        before = score_embeddings(stub, probe_x)
        old_version = before.results[0].provenance.component_version

        trial = stub.FitHead(scorer_pb2.FitHeadRequest(seed=5, activate=False), timeout=120)
        assert not trial.activated and trial.head_version != old_version
        assert score_embeddings(stub, probe_x).results[0].provenance.component_version == old_version

        fitted = stub.FitHead(scorer_pb2.FitHeadRequest(seed=0, holdout_fraction=0.25, activate=True), timeout=120)
        assert fitted.activated and fitted.previous_head_version == old_version
        assert fitted.heldout_pairs > 150 and fitted.train_pairs == 900 - fitted.heldout_pairs
        assert fitted.rated_images == 160
        # the noisy labels agree with the hidden order ~80% of the time; a random head is at ~50%
        assert fitted.heldout_pairwise_accuracy > 0.7
        assert fitted.heldout_pairwise_accuracy > fitted.baseline_heldout_pairwise_accuracy + 0.15

        after = score_embeddings(stub, probe_x)
        assert {r.provenance.component_version for r in after.results} == {fitted.head_version}
        new_raw = np.array([r.raw for r in after.results])
        old_raw = np.array([r.raw for r in before.results])
        assert not np.allclose(new_raw, old_raw)
        assert spearman(new_raw, probe_u) > 0.8  # unseen images are ordered by the hidden preference
        assert all(0.0 <= r.score <= 1.0 for r in after.results)

    with catalog_for(model_settings.database_url).session() as s:
        rows = {r.version: r for r in s.scalars(select(AestheticHeadRow))}
    assert set(rows) == {trial.head_version, fitted.head_version}
    assert rows[fitted.head_version].active and not rows[trial.head_version].active
    assert rows[fitted.head_version].metrics["heldout_pairwise_accuracy"] == pytest.approx(
        fitted.heldout_pairwise_accuracy
    )

    # a restarted scorer comes back with the active head from the catalog
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        again = score_embeddings(scorer_pb2_grpc.ScorerStub(ch), probe_x)
        assert again.results[0].provenance.component_version == fitted.head_version
        assert np.allclose([r.raw for r in again.results], new_raw, atol=1e-5)


def test_fit_head_without_data_is_failed_precondition(model_settings: Settings) -> None:
    with serve(model_settings, create_service(model_settings)) as served, grpc.insecure_channel(served.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            scorer_pb2_grpc.ScorerStub(ch).FitHead(scorer_pb2.FitHeadRequest(), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_quantile_calibration_maps_raw_onto_the_target_distribution() -> None:
    raw = torch.linspace(-3, 5, 101)
    targets = torch.linspace(0.2, 0.7, 101)
    calibration = quantile_calibration(raw, targets)
    mapped = calibration(raw)
    assert float(mapped.min()) == pytest.approx(0.2, abs=1e-4) and float(mapped.max()) == pytest.approx(0.7, abs=1e-4)
    assert bool((mapped[1:] >= mapped[:-1]).all())


def test_fit_head_with_ties_only_still_trains_from_scores() -> None:
    x = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    data = FitData(
        ids=[str(i) for i in range(20)],
        embeddings=x,
        absolute=torch.linspace(0, 1, 20),
        pairs=torch.tensor([[0, 1], [2, 3]]),
        outcome=torch.tensor([0.5, 0.5]),
    )
    result = fit_head(data, FitConfig(epochs=5), hidden=(8, 8, 8, 8))
    assert result.heldout_pairs == 0 and np.isnan(result.heldout_accuracy)
    assert result.info.in_features == 8 and result.rated_images == 20
