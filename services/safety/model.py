"""The safety model: a LAION-layout NSFW head (`heads/nsfw`) over the process-wide CLIP image tower, giving
probabilities of (safe, questionable, explicit) per image; its load also reads the tag rules and opens the catalog."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.config import Settings
from pony_common.metrics import MODEL_INFO
from pony_common.models.clip import ClipImageTower
from pony_common.models.dtypes import torch_dtype
from pony_common.models.heads import NSFW_LABELS, HeadInfo, MLPHead, load_head
from pony_common.models.lifecycle import Model
from pony_common.models.sources import require_model_source
from services.safety.tag_rules import TagRules, load_tag_rules

logger = logging.getLogger(__name__)

SERVICE = "safety"


class SafetyModel(Model):
    """`load()` reads the tag rules, loads the CLIP tower and the NSFW head and opens (migrates) the catalog; then
    `predict` gives the softmax of the head's logits on CLIP embeddings, in NSFW_LABELS order.

    The tower is `ClipImageTower.shared`, so a scorer or style tagger in the same process shares it; `teardown()`
    drops the head and leaves the shared tower and the process-wide catalog to their other users. Pass `catalog`
    to use one you hold; by default it comes from `settings`.
    """

    def __init__(self, settings: Settings, catalog: Catalog | None = None) -> None:
        super().__init__("safety service")
        self.settings = settings
        self.head_path = settings.head_path(SERVICE)
        self._given_catalog = catalog
        self._catalog: Catalog | None = None
        self._rules: TagRules | None = None
        self._tower: ClipImageTower | None = None
        self._head: MLPHead | None = None
        self._info: HeadInfo | None = None
        self._order: list[int] = []

    def _load(self) -> None:
        s = self.settings
        rules = load_tag_rules(s.safety.blocked_tags_path)
        path = require_model_source(s.model_path(SERVICE), SERVICE)
        tower = ClipImageTower.shared(path, s.device, torch_dtype(s.dtype))
        tower.load()
        head, info = load_head(self.head_path)
        if info.out_features != len(NSFW_LABELS) or sorted(info.labels) != sorted(NSFW_LABELS):
            raise ValueError(
                f"{self.head_path}: an NSFW head needs {len(NSFW_LABELS)} outputs labelled {', '.join(NSFW_LABELS)}; "
                f"got {info.out_features} labelled {list(info.labels)}"
            )
        if info.in_features != tower.dim:
            raise ValueError(
                f"{self.head_path}: head takes {info.in_features}-d embeddings, the CLIP tower gives {tower.dim}"
            )
        self._order = [list(info.labels).index(label) for label in NSFW_LABELS]
        self._tower, self._head, self._info = tower, head.to(tower.device), info
        logger.info("loaded NSFW head %s (version %s)", self.head_path, info.version)
        self._catalog = self._given_catalog or catalog_for(s.database_url)
        self._rules = rules
        MODEL_INFO.labels(SERVICE).info({"model": tower.model_id, "version": tower.version})

    def _teardown(self) -> None:
        self._head, self._info, self._order = None, None, []
        self._catalog = self._rules = None

    @property
    def rules(self) -> TagRules:
        return self.loaded(self._rules)

    @property
    def catalog(self) -> Catalog:
        return self.loaded(self._catalog)

    @property
    def tower(self) -> ClipImageTower:
        return self.loaded(self._tower)

    @property
    def model_id(self) -> str:
        return self._tower.model_id if self._tower is not None else self.settings.model_path(SERVICE)

    @property
    def model_version(self) -> str:
        return self.tower.version

    @property
    def dim(self) -> int:
        """Width of the CLIP embeddings the NSFW head takes."""
        return self.tower.dim

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, dim) CLIP embeddings of `images` (one tower forward per `batch_size` images)."""
        return self.tower.embed(list(images), batch_size=max(1, self.settings.safety.batch_size))

    @property
    def head_version(self) -> str:
        return self._info.version if self._info else ""

    def predict_embeddings(self, embeddings: torch.Tensor) -> np.ndarray:
        """(n, dim) CLIP embeddings -> (n, 3) probabilities in NSFW_LABELS order."""
        self.require_ready()
        assert self._tower is not None and self._head is not None
        with torch.inference_mode():
            logits = self._head(embeddings.to(self._tower.device, torch.float32))
            probs = torch.softmax(logits.to(torch.float32), dim=-1)[:, self._order]
        return probs.cpu().numpy()

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 3) probabilities of safe, questionable, explicit."""
        if not images:
            return np.zeros((0, len(NSFW_LABELS)), dtype=np.float32)
        return self.predict_embeddings(self.embed(images))
