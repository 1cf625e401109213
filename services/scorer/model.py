"""The aesthetic scorer model on the shared `Model` base: the process-wide CLIP image tower and an MLP head with its
calibration, hot-swappable while calls run. Knows nothing of gRPC or the catalog."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pony_common.config import Settings
from pony_common.errors import InvalidArgument, PonyError
from pony_common.metrics import MODEL_INFO
from pony_common.models.clip import ClipImageTower
from pony_common.models.dtypes import torch_dtype
from pony_common.models.heads import HeadInfo, MLPHead, load_head
from pony_common.models.lifecycle import Model
from pony_common.models.sources import require_model_source
from pony_common.tags import cumulative_tags_for_score, score_tag

logger = logging.getLogger(__name__)

SERVICE = "scorer"


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


class ScorerModel(Model):
    """CLIP ViT-L/14 image embeddings (L2-normalised) through a LAION-layout MLP head, calibrated to [0, 1].

    `load()` loads the shared tower and the head at `head_path`; then, when `head_source` is given, the head in
    the folder it names (the service passes the catalog's active head), keeping the configured one when it
    names none or one that cannot be used. `swap_head(path)` replaces the head while calls run (each call takes
    one snapshot of the head).
    """

    def __init__(
        self,
        tower_path: str,
        head_path: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        head_source: Callable[[], str | Path | None] | None = None,
    ) -> None:
        super().__init__(SERVICE)
        self.tower_path = str(tower_path)
        self.head_path = str(head_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = max(1, int(batch_size))
        self.head_source = head_source
        self._tower: ClipImageTower | None = None
        self._active: ActiveHead | None = None
        self._swap_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: Settings, head_source: Callable[[], str | Path | None] | None = None
    ) -> ScorerModel:
        """Tower from `PONY_SCORER_MODEL` (or models_dir/clip), head from `PONY_SCORER_HEAD` (or models_dir)."""
        return cls(
            settings.model_path(SERVICE),
            settings.head_path(SERVICE),
            device=settings.device,
            dtype=torch_dtype(settings.dtype),
            batch_size=settings.scorer.batch_size,
            head_source=head_source,
        )

    # --- lifecycle ---

    @property
    def model_id(self) -> str:
        return self.tower_path

    def _load(self) -> None:
        """Loads the process-wide CLIP tower and the head; checks that their widths agree."""
        tower = ClipImageTower.shared(require_model_source(self.tower_path, SERVICE), str(self.device), self.dtype)
        tower.load()
        self._tower = tower
        if self._active is None:
            self._active = self._load_head(self.head_path)
            if self.head_source is not None:
                self._adopt_source_head(self.head_source)
        logger.info(
            "scorer ready",
            extra={"model": tower.model_id, "model_version": tower.version, "head_version": self._active.version},
        )
        self._publish_info(tower, self._active)

    def _adopt_source_head(self, source: Callable[[], str | Path | None]) -> None:
        try:
            path = source()
            if path is None:
                return
            active = self._load_head(str(path))
        except (PonyError, OSError, ValueError) as exc:
            logger.warning("keeping the configured head: no usable active head from its source (%s)", exc)
            return
        if self._active is None or active.version != self._active.version:
            self._install(active)

    def _teardown(self) -> None:
        # The tower's weights stay with the process-wide tower (the style tagger and safety may share it).
        self._tower = None
        self._active = None

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
        self._install(active)
        if self._tower is not None:
            self._publish_info(self._tower, active)
        return active

    def _install(self, active: ActiveHead) -> None:
        with self._swap_lock:
            previous = self._active
            self._active = active
        logger.info(
            "head swapped",
            extra={"from": previous.version if previous else "", "to": active.version, "path": active.path},
        )

    @staticmethod
    def _publish_info(tower: ClipImageTower, head: ActiveHead) -> None:
        MODEL_INFO.labels(SERVICE).info({"model": tower.model_id, "version": tower.version, "head": head.version})

    # --- what it is ---

    @property
    def tower(self) -> ClipImageTower:
        """The CLIP image tower (UNAVAILABLE while the model is loading)."""
        return self.loaded(self._tower)

    @property
    def active_head(self) -> ActiveHead:
        """The head calls use now (UNAVAILABLE while the model is loading)."""
        return self.loaded(self._active)

    @property
    def head_version(self) -> str:
        return self.active_head.version

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
