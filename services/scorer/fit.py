"""Training a new aesthetic head on stored CLIP embeddings: Bradley-Terry loss on comparisons plus regression
on absolute ratings (current scores blended with Elo), with held-out pairwise accuracy."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pony_common.errors import FailedPrecondition
from pony_common.models.heads import LAION_HIDDEN, Calibration, HeadInfo, MLPHead
from services.scorer.preferences import DEFAULT_K, OUTCOME_SCORE, elo_probability, replay_elo
from services.scorer.store import EMBEDDING_KIND, FitRows

logger = logging.getLogger(__name__)

# Games after which an image's Elo counts as much as its stored score in the regression target.
ELO_TRUST_GAMES = 10
CALIBRATION_POINTS = 21


@dataclass(frozen=True)
class FitConfig:
    holdout_fraction: float = 0.2
    epochs: int = 60
    # Weight of the Bradley-Terry loss; the regression loss has weight 1.
    pairwise_weight: float = 1.0
    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 256
    # P(a preferred to b) = sigmoid(bt_scale * (s_a - s_b)) on the score scale.
    bt_scale: float = 10.0
    elo_k: float = DEFAULT_K
    # Images with a stored score but no comparison added to the regression set (a random slice of ids).
    max_rated: int = 20000


@dataclass
class FitData:
    """Embeddings of the images involved and the judgements between them, in chronological order."""

    ids: list[str]
    embeddings: torch.Tensor  # (n, d) float32
    absolute: torch.Tensor  # (n,) stored score in [0, 1], NaN where none
    pairs: torch.Tensor  # (m, 2) indices into ids: (image_a, image_b)
    outcome: torch.Tensor  # (m,) score of image_a: 1, 0 or 0.5
    dropped_pairs: int = 0  # comparisons of images without a stored embedding


@dataclass
class FitResult:
    head: MLPHead
    info: HeadInfo
    heldout_accuracy: float
    baseline_accuracy: float
    train_pairs: int
    heldout_pairs: int
    rated_images: int


def fit_data(rows: FitRows, dim: int) -> FitData:
    """The tensors a fit trains on: the images with an embedding (in id order) and the comparisons between them."""
    ids = sorted(rows.vectors)
    index = {image_id: i for i, image_id in enumerate(ids)}
    kept = [(a, b, outcome) for a, b, outcome in rows.comparisons if a in index and b in index]
    embeddings = torch.from_numpy(np.stack([rows.vectors[i] for i in ids])) if ids else torch.empty(0, dim)
    return FitData(
        ids=ids,
        embeddings=embeddings.to(torch.float32),
        absolute=torch.tensor([rows.scores.get(i, math.nan) for i in ids], dtype=torch.float32),
        pairs=torch.tensor([[index[a], index[b]] for a, b, _ in kept], dtype=torch.long).reshape(-1, 2),
        outcome=torch.tensor([OUTCOME_SCORE[outcome] for _, _, outcome in kept], dtype=torch.float32),
        dropped_pairs=len(rows.comparisons) - len(kept),
    )


def split_pairs(count: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of training and held-out pairs; the training ones stay in their original (time) order."""
    if count == 0:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    held = round(fraction * count)
    if fraction > 0 and count >= 2:
        held = min(max(held, 1), count - 1)
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


def regression_targets(absolute: torch.Tensor, pairs: torch.Tensor, outcome: torch.Tensor, k: float) -> torch.Tensor:
    """Per image: its stored score blended with its Elo win chance (replayed over `pairs` in order), NaN if neither.

    The blend weight of Elo is games / (games + ELO_TRUST_GAMES).
    """
    games = [(int(a), int(b), float(s)) for (a, b), s in zip(pairs.tolist(), outcome.tolist(), strict=True)]
    ratings, counts = replay_elo(games, k)
    targets = absolute.clone()
    for image, rating in ratings.items():
        elo = elo_probability(rating)
        weight = counts[image] / (counts[image] + ELO_TRUST_GAMES)
        stored = float(absolute[image])
        targets[image] = elo if math.isnan(stored) else weight * elo + (1 - weight) * stored
    return targets


def _warm_start(base: MLPHead, info: HeadInfo) -> MLPHead | None:
    """The base head rescaled so its raw output is its calibrated score (affine calibrations only)."""
    calibration = info.calibration or Calibration()
    if calibration.kind != "affine":
        return None
    head = copy.deepcopy(base).to("cpu", torch.float32).requires_grad_(True)
    span = calibration.hi - calibration.lo
    last = head.layers[-1]
    with torch.no_grad():
        last.weight.div_(span)
        last.bias.sub_(calibration.lo).div_(span)
    return head


def pairwise_accuracy(raw: torch.Tensor, pairs: torch.Tensor, outcome: torch.Tensor) -> tuple[float, int]:
    """Share of decisive pairs (ties left out) the raw outputs order correctly (equal outputs count half)."""
    decisive = outcome != 0.5
    if not bool(decisive.any()):
        return math.nan, 0
    p, o = pairs[decisive], outcome[decisive]
    diff = raw[p[:, 0]] - raw[p[:, 1]]
    sign = torch.where(o > 0.5, diff, -diff)
    correct = (sign > 0).float() + 0.5 * (sign == 0).float()
    return float(correct.mean()), int(decisive.sum())


def quantile_calibration(raw: torch.Tensor, targets: torch.Tensor, points: int = CALIBRATION_POINTS) -> Calibration:
    """Maps raw outputs onto the distribution of the targets: the q-quantile of raw -> the q-quantile of targets."""
    if raw.numel() < 2:
        return Calibration("affine", lo=0.0, hi=1.0)
    qs = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    xs_raw = torch.quantile(raw.to(torch.float64), qs).tolist()
    ys = torch.quantile(targets.to(torch.float64).clamp(0, 1), qs).tolist()
    xs: list[float] = []
    for v in xs_raw:
        v = float(f"{v:.8g}")
        if xs and v <= xs[-1]:
            v = math.nextafter(xs[-1], math.inf)
        xs.append(v)
    return Calibration("percentile", raw=tuple(xs), score=tuple(round(y, 6) for y in ys))


def _raw(head: MLPHead, embeddings: torch.Tensor) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return head(torch.nn.functional.normalize(embeddings, dim=-1))[:, 0].float()


def fit_head(
    data: FitData,
    config: FitConfig,
    base: tuple[MLPHead, HeadInfo] | None = None,
    *,
    embedding_model: str = "",
    hidden: Sequence[int] | None = None,
) -> FitResult:
    """Trains a head (warm-started from `base` when its calibration is affine) and measures it on held-out pairs."""
    n, dim = data.embeddings.shape
    train_idx, held_idx = split_pairs(len(data.pairs), config.holdout_fraction, config.seed)
    train_pairs, train_outcome = data.pairs[train_idx], data.outcome[train_idx]
    held_pairs, held_outcome = data.pairs[held_idx], data.outcome[held_idx]
    targets = regression_targets(data.absolute, train_pairs, train_outcome, config.elo_k)
    rated = torch.nonzero(~torch.isnan(targets)).flatten()
    if len(train_pairs) == 0 and len(rated) == 0:
        raise FailedPrecondition(
            f"nothing to fit: no comparisons or scored images with stored {dim}-d '{EMBEDDING_KIND}' embeddings"
        )
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = _warm_start(*base) if base is not None and base[1].in_features == dim else None
    if head is None:
        widths = tuple(hidden or (base[1].hidden if base is not None else LAION_HIDDEN))
        head = MLPHead(dim, 1, widths)
    x = torch.nn.functional.normalize(data.embeddings, dim=-1)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=1e-4)
    bce = torch.nn.BCEWithLogitsLoss()
    units = max(len(train_pairs), len(rated))
    steps_per_epoch = max(1, math.ceil(units / config.batch_size))
    for _ in range(config.epochs):
        head.train()
        pair_order = torch.randperm(len(train_pairs), generator=generator)
        for step in range(steps_per_epoch):
            loss = torch.zeros(())
            if len(train_pairs) and config.pairwise_weight > 0:
                chosen = pair_order[step * config.batch_size : (step + 1) * config.batch_size]
                if len(chosen) == 0:
                    chosen = torch.randint(len(train_pairs), (config.batch_size,), generator=generator)
                p = train_pairs[chosen]
                logits = config.bt_scale * (head(x[p[:, 0]]) - head(x[p[:, 1]]))[:, 0]
                loss = loss + config.pairwise_weight * bce(logits, train_outcome[chosen])
            if len(rated):
                pick = rated[torch.randint(len(rated), (min(config.batch_size, len(rated)),), generator=generator)]
                loss = loss + torch.nn.functional.mse_loss(head(x[pick])[:, 0], targets[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head = head.eval().requires_grad_(False)
    raw = _raw(head, data.embeddings)
    calibration = (
        quantile_calibration(raw[rated], targets[rated]) if len(rated) >= 2 else Calibration("affine", 0.0, 1.0)
    )
    info = HeadInfo(
        kind="aesthetic",
        in_features=dim,
        out_features=1,
        hidden=head.hidden,
        calibration=calibration,
        embedding_model=embedding_model or (base[1].embedding_model if base else ""),
    )
    accuracy, held = pairwise_accuracy(raw, held_pairs, held_outcome)
    baseline = math.nan
    if base is not None and base[1].in_features == dim:
        base_head = copy.deepcopy(base[0]).to("cpu", torch.float32)
        baseline, _ = pairwise_accuracy(_raw(base_head, data.embeddings), held_pairs, held_outcome)
    logger.info(
        "head fitted",
        extra={"accuracy": accuracy, "baseline": baseline, "train_pairs": len(train_pairs), "held": held, "n": n},
    )
    return FitResult(head, info, accuracy, baseline, len(train_pairs), held, len(rated))
