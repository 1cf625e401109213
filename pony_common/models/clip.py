"""The CLIP image tower shared by the scorer, style tagger and safety in one process, and the tiny CLIP."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BaseImageProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from pony_common.metrics import CLIP_FORWARD_IMAGES
from pony_common.models.loading import model_load_lock

logger = logging.getLogger(__name__)

TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_PROJECTION_DIM = 64
_WEIGHT_SUFFIXES = (".safetensors",)


def build_tiny_clip(tokenizer: CLIPTokenizer, *, seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A small `CLIPModel` (ViT 32 px, patch 8, 2 layers, projection 64) and its `CLIPProcessor`."""
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": TINY_CLIP_PROJECTION_DIM,
        },
        vision_config={
            "image_size": TINY_CLIP_IMAGE_SIZE,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": TINY_CLIP_PROJECTION_DIM,
        },
        projection_dim=TINY_CLIP_PROJECTION_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def weights_version(path: str | Path) -> str:
    """A short content hash of a local model folder's config and weights (12 hex characters)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / "config.json", *sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)]
    if len(files) == 1:
        files += sorted(path.glob("*.bin"))
    for file in files:
        if file.is_file():
            digest.update(file.name.encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()[:12]


class ClipImageTower:
    """CLIP's vision tower + projection: L2-normalised float32 image embeddings.

    `shared()` hands out one tower per (path, device, dtype) in a process; the weights load lazily on
    first use (or `load()`), once, under a lock.
    """

    _instances: dict[tuple[str, str, torch.dtype], ClipImageTower] = {}
    _instances_lock = threading.Lock()

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model_id = str(path)
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._vision: torch.nn.Module | None = None
        self._projection: torch.nn.Module | None = None
        self._processor: BaseImageProcessor | None = None
        self._dim = 0
        self._version = ""
        self._forwards = CLIP_FORWARD_IMAGES.labels(self.model_id)
        self._forward_lock = threading.Lock()
        self.forward_images = 0  # images through the vision tower so far (also `pony_clip_forward_images_total`)

    @classmethod
    def shared(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ClipImageTower:
        """The process-wide tower for these weights on this device and dtype (created, not yet loaded)."""
        key = (str(path), str(torch.device(device)), dtype)
        with cls._instances_lock:
            tower = cls._instances.get(key)
            if tower is None:
                tower = cls._instances[key] = cls(str(path), device, dtype)
            return tower

    @property
    def ready(self) -> bool:
        return self._vision is not None

    def load(self) -> None:
        """Load the weights and image processor (idempotent, thread-safe)."""
        if self._vision is not None:
            return
        # The process-wide load lock first, then the tower's: one order everywhere, no deadlock.
        with model_load_lock, self._lock:
            if self._vision is not None:
                return
            logger.info("loading CLIP image tower %s on %s (%s)", self.model_id, self.device, self.dtype)
            processor = AutoImageProcessor.from_pretrained(self.model_id)
            # The whole CLIPModel loads cleanly from any CLIP checkpoint; keep only the image side.
            model = CLIPModel.from_pretrained(self.model_id, dtype=self.dtype)
            local = Path(self.model_id)
            hub_revision = str(getattr(model.config, "_commit_hash", None) or "")
            self._version = weights_version(local) if local.is_dir() else hub_revision[:12]
            self._dim = int(model.config.projection_dim)
            self._projection = model.visual_projection.to(self.device).eval().requires_grad_(False)
            self._processor = processor
            self._vision = model.vision_model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """Width of the embeddings (the projection dim: 768 for ViT-L/14)."""
        self.load()
        return self._dim

    @property
    def version(self) -> str:
        """Short hash of the loaded config and weights, for provenance."""
        self.load()
        return self._version or "unknown"

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> pixel values (resize, crop, normalise) as float32 on the CPU."""
        self.load()
        assert self._processor is not None
        return self._processor(images=list(images), return_tensors="pt")["pixel_values"]

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values -> (n, dim) float32 L2-normalised embeddings on the CPU."""
        self.load()
        assert self._vision is not None and self._projection is not None
        with torch.inference_mode():
            pooled = self._vision(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
            emb = self._projection(pooled).to(torch.float32)
            out = torch.nn.functional.normalize(emb, dim=-1).cpu()
        with self._forward_lock:
            self.forward_images += len(out)
        self._forwards.inc(len(out))
        return out

    def embed(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Images -> (n, dim) float32 L2-normalised embeddings on the CPU, `batch_size` at a time."""
        if not images:
            return torch.empty(0, self.dim, dtype=torch.float32)
        parts = [
            self.embed_pixels(self.preprocess(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)


def build_full_clip(out: Path) -> None:
    """For benchmarks: CLIP ViT-L/14 vision shapes (224 px, patch 14, 24 layers, width 1024, projection 768)
    with random weights; the compute costs what the real model costs. The text side is kept small: the scorer
    loads it but never runs it."""
    config = CLIPConfig(
        text_config={"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16},
        projection_dim=768,
    )  # fmt: skip
    with model_load_lock, torch.random.fork_rng():
        torch.manual_seed(0)
        model = CLIPModel(config)
    model.save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(out)
