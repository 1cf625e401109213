"""The style image encoder named in config: CLIP (the process-wide shared tower) or a plain ViT-family model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from pony_common.models.clip import ClipImageTower, weights_version

logger = logging.getLogger(__name__)

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


class ImageEncoder(Protocol):
    """What the style tagger needs of an encoder (`ClipImageTower` has exactly this shape)."""

    model_id: str

    @property
    def ready(self) -> bool: ...

    @property
    def dim(self) -> int: ...

    @property
    def version(self) -> str: ...

    def load(self) -> None: ...

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor: ...


class VitImageEncoder:
    """A transformers vision backbone (ViT, DINOv2, …) via AutoModel: the pooled (or CLS) output, L2-normalised."""

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model_id = str(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self._processor = None
        self._version = ""

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            logger.info("loading style encoder %s on %s", self.model_id, self.device)
            processor = AutoImageProcessor.from_pretrained(self.model_id)
            model = AutoModel.from_pretrained(self.model_id, dtype=self.dtype)
            model = model.to(self.device).eval().requires_grad_(False)
            local = Path(self.model_id)
            self._version = weights_version(local) if local.is_dir() else getattr(model.config, "_commit_hash", "")
            self._processor = processor
            self._model = model

    @property
    def dim(self) -> int:
        self.load()
        assert self._model is not None
        return int(self._model.config.hidden_size)

    @property
    def version(self) -> str:
        self.load()
        return self._version or "unknown"

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        self.load()
        assert self._model is not None and self._processor is not None
        if not images:
            return torch.empty(0, self.dim, dtype=torch.float32)
        parts = []
        for i in range(0, len(images), batch_size):
            pixels = self._processor(images=list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = self._model(pixel_values=pixels.to(self.device, self.dtype))
                pooled = getattr(out, "pooler_output", None)
                emb = pooled if pooled is not None else out.last_hidden_state[:, 0]
                parts.append(torch.nn.functional.normalize(emb.to(torch.float32), dim=-1).cpu())
        return torch.cat(parts)


def create_encoder(path: str, device: str, dtype: torch.dtype) -> ImageEncoder:
    """The encoder for the model at `path` (reads its config): CLIP -> `ClipImageTower.shared`, else ViT-style."""
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in CLIP_MODEL_TYPES:
        return ClipImageTower.shared(path, device, dtype)
    return VitImageEncoder(path, device, dtype)
