"""The NSFW classifier: a LAION-layout MLP head (`heads/nsfw`) over the shared CLIP tower's image embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pony_common.errors import FailedPrecondition
from pony_common.models.clip import ClipImageTower
from pony_common.models.heads import NSFW_LABELS, HeadInfo, MLPHead, load_head

logger = logging.getLogger(__name__)


class NsfwClassifier:
    """Probabilities of (safe, questionable, explicit) per image: softmax of the head's logits on CLIP embeddings."""

    def __init__(self, tower: ClipImageTower, head_path: str) -> None:
        self.tower = tower
        self.head_path = head_path
        self._head: MLPHead | None = None
        self._info: HeadInfo | None = None
        self._order: list[int] = []

    def load(self) -> None:
        self.tower.load()
        head, info = load_head(self.head_path)
        if info.out_features != len(NSFW_LABELS) or sorted(info.labels) != sorted(NSFW_LABELS):
            raise ValueError(
                f"{self.head_path}: an NSFW head needs {len(NSFW_LABELS)} outputs labelled {', '.join(NSFW_LABELS)}; "
                f"got {info.out_features} labelled {list(info.labels)}"
            )
        if info.in_features != self.tower.dim:
            raise ValueError(
                f"{self.head_path}: head takes {info.in_features}-d embeddings, the CLIP tower gives {self.tower.dim}"
            )
        self._order = [list(info.labels).index(label) for label in NSFW_LABELS]
        self._head, self._info = head.to(self.tower.device), info
        logger.info("loaded NSFW head %s (version %s)", self.head_path, info.version)

    @property
    def ready(self) -> bool:
        return self._head is not None and self.tower.ready

    @property
    def head_version(self) -> str:
        return self._info.version if self._info else ""

    def predict_embeddings(self, embeddings: torch.Tensor) -> np.ndarray:
        """(n, dim) CLIP embeddings -> (n, 3) probabilities in NSFW_LABELS order."""
        if self._head is None:
            raise FailedPrecondition("the NSFW classifier is not loaded")
        with torch.inference_mode():
            logits = self._head(embeddings.to(self.tower.device, torch.float32))
            probs = torch.softmax(logits.to(torch.float32), dim=-1)[:, self._order]
        return probs.cpu().numpy()

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, 3) probabilities of safe, questionable, explicit."""
        if not images:
            return np.zeros((0, len(NSFW_LABELS)), dtype=np.float32)
        return self.predict_embeddings(self.tower.embed(list(images)))
