"""The aesthetic scorer model: the shared CLIP image tower, an MLP head with its calibration, hot-swappable heads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pony_common.config import Settings
from pony_common.errors import FailedPrecondition, InvalidArgument
from pony_common.models.clip import ClipImageTower
from pony_common.models.dtypes import torch_dtype
from pony_common.models.heads import HeadInfo, MLPHead, load_head
from pony_common.tags import cumulative_tags_for_score, score_tag

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreValue:
    """One image's score: the head's raw output, the calibrated score in [0, 1] and its tags."""

    raw: float
    score: float
    tag: str
    cumulative_tags: str


@dataclass(frozen=True)
class ActiveHead:
    """A loaded head; replaced as a whole on a hot swap so one batch always uses one head."""

    head: MLPHead
    info: HeadInfo
    path: str

    @property
    def version(self) -> str:
        return self.info.version


@dataclass(frozen=True)
class Scored:
    """Scores of a batch and the head version that produced them."""

    values: list[ScoreValue]
    head_version: str


class AestheticScorer:
    """CLIP ViT-L/14 image embeddings (L2-normalised) through a LAION-layout MLP head, calibrated to [0, 1].

    `load()` loads the shared tower and the head; `swap_head(path)` replaces the head while calls run
    (each call takes one snapshot of the head). Knows nothing of gRPC or the catalog.
    """

    def __init__(
        self,
        tower_path: str,
        head_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.tower_path = str(tower_path)
        self.head_path = str(head_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self._tower: ClipImageTower | None = None
        self._active: ActiveHead | None = None
        self._swap_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> AestheticScorer:
        """Tower from `PONY_SCORER_MODEL` (or models_dir/clip), head from `PONY_SCORER_HEAD` (or models_dir)."""
        return cls(
            settings.model_path("scorer"),
            settings.head_path("scorer"),
            device=settings.device,
            dtype=torch_dtype(settings.dtype),
            batch_size=settings.scorer.batch_size,
        )

    # --- lifecycle ---

    @property
    def ready(self) -> bool:
        return self._tower is not None and self._tower.ready and self._active is not None

    def load(self) -> None:
        """Loads the process-wide CLIP tower and the configured head; checks that their widths agree."""
        tower = ClipImageTower.shared(self.tower_path, str(self.device), self.dtype)
        tower.load()
        self._tower = tower
        if self._active is None:
            self._active = self._load_head(self.head_path)
        logger.info(
            "scorer ready",
            extra={"model": tower.model_id, "model_version": tower.version, "head_version": self.head_version},
        )

    def _load_head(self, path: str) -> ActiveHead:
        head, info = load_head(path, map_location=self.device)
        if info.out_features != 1:
            raise ValueError(f"aesthetic head {path} has {info.out_features} outputs; it must have 1")
        if self._tower is not None and info.in_features != self._tower.dim:
            raise ValueError(
                f"head {path} takes {info.in_features}-d embeddings but the tower {self._tower.model_id} "
                f"gives {self._tower.dim}-d"
            )
        return ActiveHead(head.requires_grad_(False), info, str(path))

    def swap_head(self, path: str | Path) -> ActiveHead:
        """Loads the head at `path` and makes it the one every later call uses (thread-safe)."""
        active = self._load_head(str(path))
        with self._swap_lock:
            previous = self._active
            self._active = active
        logger.info(
            "head swapped",
            extra={"from": previous.version if previous else "", "to": active.version, "path": str(path)},
        )
        return active

    # --- what it is ---

    @property
    def tower(self) -> ClipImageTower:
        if self._tower is None:
            raise FailedPrecondition("the scorer model is not loaded yet")
        return self._tower

    @property
    def active_head(self) -> ActiveHead:
        active = self._active
        if active is None:
            raise FailedPrecondition("the scorer head is not loaded yet")
        return active

    @property
    def head_version(self) -> str:
        return self.active_head.version

    @property
    def model_id(self) -> str:
        return self.tower.model_id

    @property
    def model_version(self) -> str:
        return self.tower.version

    @property
    def dim(self) -> int:
        return self.tower.dim

    # --- work ---

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, dim) float32 L2-normalised CLIP image embeddings on the CPU."""
        return self.tower.embed(list(images), batch_size=self.batch_size)

    def score_embeddings(self, embeddings: torch.Tensor, head: ActiveHead | None = None) -> Scored:
        """Scores (n, dim) embeddings; rows are L2-normalised first (LAION heads expect unit vectors)."""
        active = head or self.active_head
        if embeddings.ndim != 2 or embeddings.shape[1] != active.info.in_features:
            raise InvalidArgument(
                "embeddings", f"expected (n, {active.info.in_features}) embeddings, got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] == 0:
            return Scored([], active.version)
        x = torch.nn.functional.normalize(embeddings.to(torch.float32), dim=-1)
        with torch.inference_mode():
            raw = active.head(x.to(self.device))[:, 0].float().cpu()
            scores = active.info.calibrate(raw)
        values = [
            ScoreValue(float(r), float(s), score_tag(float(s)), cumulative_tags_for_score(float(s)))
            for r, s in zip(raw.tolist(), scores.tolist(), strict=True)
        ]
        return Scored(values, active.version)

    def score_images(self, images: Sequence[Image.Image]) -> Scored:
        """Embeds and scores images with one head snapshot."""
        active = self.active_head
        return self.score_embeddings(self.embed(images), active)

    def raw_scores(self, embeddings: torch.Tensor, head: ActiveHead | None = None) -> torch.Tensor:
        """The head's raw outputs for (n, dim) embeddings (after L2 normalisation), float32 on the CPU."""
        active = head or self.active_head
        x = torch.nn.functional.normalize(embeddings.to(torch.float32), dim=-1)
        with torch.inference_mode():
            return active.head(x.to(self.device))[:, 0].float().cpu()
