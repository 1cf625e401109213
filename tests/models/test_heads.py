"""MLP heads: LAION's layout and outputs, our head folder format, calibration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from pony_common.models.heads import (
    LAION_HIDDEN,
    NSFW_LABELS,
    Calibration,
    HeadInfo,
    MLPHead,
    load_head,
    save_head,
)
from tests.conftest import LAION_HEAD_PATH

# LAION's published head (christophschuhmann/improved-aesthetic-predictor), from the shared reference folder.
LAION_PTH = Path(os.environ.get("PONY_TEST_LAION_HEAD", str(LAION_HEAD_PATH)))


class LaionReferenceMLP(nn.Module):
    """christophschuhmann/improved-aesthetic-predictor's MLP, as published (layers only)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_state_dict_keys_are_laions() -> None:
    keys = set(MLPHead(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert [m.out_features for m in MLPHead(768).layers if isinstance(m, nn.Linear)] == [*LAION_HIDDEN, 1]


@pytest.mark.skipif(not LAION_PTH.is_file(), reason=f"LAION reference checkpoint not present at {LAION_PTH}")
def test_laion_checkpoint_gives_the_reference_mlps_outputs() -> None:
    head, info = load_head(LAION_PTH)
    assert (info.kind, info.in_features, info.out_features, info.hidden) == ("aesthetic", 768, 1, LAION_HIDDEN)
    assert len(info.version) == 12
    reference = LaionReferenceMLP(768)
    reference.load_state_dict(torch.load(LAION_PTH, map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.nn.functional.normalize(torch.randn(64, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        ours, theirs = head(x), reference(x)
    assert ours.shape == (64, 1)
    assert torch.equal(ours, theirs)
    assert not head.training
    # LAION's scale is 1..10: the default calibration maps it affinely to 0..1.
    scores = info.calibrate(ours[:, 0])
    assert torch.allclose(scores, ((ours[:, 0] - 1) / 9).clamp(0, 1))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = MLPHead(64, 3, (32, 16, 16, 8)).eval()
    info = HeadInfo(kind="nsfw", in_features=64, out_features=3, hidden=(32, 16, 16, 8), labels=NSFW_LABELS)
    save_head(tmp_path / "nsfw", head, info)
    loaded, loaded_info = load_head(tmp_path / "nsfw")
    assert loaded_info == info
    assert loaded_info.labels == ("safe", "questionable", "explicit")
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))


def test_head_json_must_agree_with_the_weights(tmp_path: Path) -> None:
    info = HeadInfo(kind="aesthetic", in_features=32, hidden=(32, 16, 16, 8))
    save_head(tmp_path, MLPHead(64, 1, (32, 16, 16, 8)), info)
    with pytest.raises(ValueError, match="disagree"):
        load_head(tmp_path)


def test_affine_calibration_clamps_to_unit_interval() -> None:
    info = HeadInfo(kind="aesthetic", in_features=8, calibration=Calibration("affine", lo=1.0, hi=10.0))
    raw = torch.tensor([0.0, 1.0, 5.5, 10.0, 12.0])
    assert torch.allclose(info.calibrate(raw), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_percentile_calibration_interpolates_the_table() -> None:
    cal = Calibration("percentile", raw=(0.0, 1.0, 3.0), score=(0.0, 0.5, 1.0))
    raw = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 9.0])
    assert torch.allclose(cal(raw), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_percentile_calibration_from_samples_is_monotone_and_spreads_scores() -> None:
    samples = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    cal = Calibration.from_samples(samples)
    assert list(cal.raw) == sorted(cal.raw) and len(set(cal.raw)) == len(cal.raw)
    scores = cal(samples)
    assert scores.min() == 0.0 and scores.max() == 1.0
    assert abs(float(scores.median()) - 0.5) < 0.05


def test_bad_calibrations_are_refused() -> None:
    with pytest.raises(ValueError):
        Calibration("affine", lo=2.0, hi=2.0)
    with pytest.raises(ValueError):
        Calibration("percentile", raw=(1.0, 1.0), score=(0.0, 1.0))
    with pytest.raises(ValueError):
        Calibration("sigmoid")


def test_tiny_heads_load_and_score_tiny_clip_embeddings(tiny_dirs: dict[str, Path]) -> None:
    from PIL import Image

    from pony_common.models.clip import ClipImageTower

    aesthetic, a_info = load_head(tiny_dirs["heads/aesthetic"])
    nsfw, n_info = load_head(tiny_dirs["heads/nsfw"])
    tower = ClipImageTower(str(tiny_dirs["clip"]))
    assert a_info.in_features == n_info.in_features == tower.dim
    assert a_info.calibration is not None and a_info.calibration.kind == "percentile"
    assert n_info.labels == NSFW_LABELS and n_info.out_features == 3
    colours = ["red", "navy", "white", "black", "gold", "teal", "pink", "gray"]
    emb = tower.embed([Image.new("RGB", (40 + 7 * i, 50), c) for i, c in enumerate(colours)])
    with torch.no_grad():
        scores = a_info.calibrate(aesthetic(emb)[:, 0])
        logits = nsfw(emb)
    assert logits.shape == (len(colours), 3)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert len(set(scores.tolist())) > 1
