"""The style tagger's model on the shared `Model` lifecycle: the image encoder named in config (CLIP's
process-wide shared tower or a plain ViT-family backbone) and the catalog it serves against. No gRPC."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from pony_common.catalog.db import Catalog, catalog_for
from pony_common.config import ConfigError, Settings
from pony_common.metrics import MODEL_INFO
from pony_common.models.clip import ClipImageTower, weights_version
from pony_common.models.dtypes import torch_dtype
from pony_common.models.lifecycle import Model
from pony_common.models.sources import require_model_source
from services.style_tagger.clusters import validate_tag_format
from services.style_tagger.index import check_index_kind

logger = logging.getLogger(__name__)

SERVICE = "style_tagger"
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
    """A transformers vision backbone (ViT, DINOv2, …) via AutoModel: the pooled (or CLS) output, L2-normalised.

    `load()` is idempotent; `StyleTaggerModel` calls it under its lifecycle lock before any other use.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model_id = str(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self._model: torch.nn.Module | None = None
        self._processor = None
        self._version = ""

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self) -> None:
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

    def _loaded(self) -> torch.nn.Module:
        if self._model is None:
            raise RuntimeError(f"style encoder {self.model_id} is not loaded")
        return self._model

    @property
    def dim(self) -> int:
        return int(self._loaded().config.hidden_size)

    @property
    def version(self) -> str:
        self._loaded()
        return self._version or "unknown"

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        model = self._loaded()
        assert self._processor is not None
        if not images:
            return torch.empty(0, self.dim, dtype=torch.float32)
        parts = []
        for i in range(0, len(images), batch_size):
            pixels = self._processor(images=list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = model(pixel_values=pixels.to(self.device, self.dtype))
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


def check_style_config(settings: Settings) -> None:
    """Raises ConfigError on a bad tag format, index kind or artist share (at load, not at the first call)."""
    try:
        validate_tag_format(settings.style_tag_format)
    except ValueError as exc:
        raise ConfigError(f"PONY_STYLE_TAG_FORMAT: {exc}") from None
    check_index_kind(settings.style_tagger.index)
    share = settings.style_tagger.max_artist_share
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"PONY_STYLE_MAX_ARTIST_SHARE={share} must be in (0, 1]")


class StyleTaggerModel(Model):
    """`load()` checks the style config, loads the encoder and opens (migrates) the catalog; then `embed`.

    The CLIP encoder is `ClipImageTower.shared`, so a scorer or safety model in the same process uses the same
    weights. Pass `encoder`/`catalog` to use ones you hold; by default they come from `settings`.
    """

    def __init__(self, settings: Settings, encoder: ImageEncoder | None = None, catalog: Catalog | None = None) -> None:
        super().__init__("style tagger")
        self.settings = settings
        self._given_encoder = encoder
        self._given_catalog = catalog
        self._encoder: ImageEncoder | None = None
        self._catalog: Catalog | None = None

    def _load(self) -> None:
        s = self.settings
        check_style_config(s)
        encoder = self._given_encoder or create_encoder(
            require_model_source(s.model_path(SERVICE), SERVICE), s.device, torch_dtype(s.dtype)
        )
        encoder.load()
        self._encoder = encoder
        self._catalog = self._given_catalog or catalog_for(s.database_url)
        MODEL_INFO.labels(SERVICE).info({"model": encoder.model_id, "version": encoder.version})

    def _teardown(self) -> None:
        # The shared CLIP tower and the process-wide catalog stay with their other users.
        self._encoder = None
        self._catalog = None

    @property
    def encoder(self) -> ImageEncoder:
        return self.loaded(self._encoder)

    @property
    def catalog(self) -> Catalog:
        return self.loaded(self._catalog)

    @property
    def model_id(self) -> str:
        if self._encoder is not None:
            return self._encoder.model_id
        return self._given_encoder.model_id if self._given_encoder else self.settings.model_path(SERVICE)

    @property
    def version(self) -> str:
        return self.encoder.version

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32 L2-normalised style embeddings."""
        return self.encoder.embed(list(images)).numpy()
