"""VAE latents cached in the blob store: computed once per (VAE, image, bucket), reused by every later step and run."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from pony_common.blobs import BlobStore
from pony_common.images import decode_image
from services.trainer.training.buckets import Bucket, fit_to_bucket, to_pixels
from services.trainer.training.manifest import ManifestItem, read_image_bytes

log = logging.getLogger(__name__)

# Bumped when the resize/crop or the stored layout changes, so old cache entries are not reused.
CACHE_LAYOUT = "v1"


def vae_fingerprint(vae: AutoencoderKL) -> str:
    """A short hash of the VAE's weights and config: the cache key part that says which VAE made a latent."""
    h = hashlib.sha256(repr(sorted(dict(vae.config).items())).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """Latent distributions (mean and log-variance, float32) of images fitted to a bucket, stored as safetensors."""

    def __init__(self, blobs: BlobStore, vae: AutoencoderKL, *, device: torch.device, max_pixels: int) -> None:
        self.blobs = blobs
        self.vae = vae
        self.device = device
        self.max_pixels = max_pixels
        self.vae_id = vae_fingerprint(vae)
        self.encoded = 0  # images this process ran through the VAE encoder
        self.reused = 0  # entries found already cached

    def key(self, image_id: str, bucket: Bucket) -> str:
        return f"latents/{CACHE_LAYOUT}/{self.vae_id}/{image_id[:2]}/{image_id}/{bucket.key}.safetensors"

    def ensure(self, pairs: Iterable[tuple[ManifestItem, Bucket]], batch_size: int = 8) -> int:
        """Encodes and stores the pairs not cached yet (batched per bucket); returns how many were encoded."""
        missing: dict[Bucket, list[ManifestItem]] = {}
        for item, bucket in pairs:
            if self.blobs.exists(self.key(item.image_id, bucket)):
                self.reused += 1
            else:
                missing.setdefault(bucket, []).append(item)
        count = 0
        for bucket, items in missing.items():
            for start in range(0, len(items), batch_size):
                count += self._encode(items[start : start + batch_size], bucket)
        return count

    @torch.no_grad()
    def _encode(self, items: Sequence[ManifestItem], bucket: Bucket) -> int:
        pixels = []
        for item in items:
            data = read_image_bytes(item.image_uri, self.blobs)
            image = decode_image(data, field=f"manifest[{item.image_id}].image_uri", max_pixels=self.max_pixels)
            pixels.append(to_pixels(fit_to_bucket(image, bucket)))
        batch = torch.stack(pixels).to(self.device, self.vae.dtype)
        params = self.vae.encode(batch).latent_dist.parameters.float().cpu()
        for item, p in zip(items, params, strict=True):
            self.blobs.put(self.key(item.image_id, bucket), save_tensors({"parameters": p.contiguous()}))
        self.encoded += len(items)
        log.info("encoded latents", extra={"bucket": bucket.key, "images": len(items)})
        return len(items)

    def get(self, image_id: str, bucket: Bucket) -> torch.Tensor:
        """The stored (2C, h, w) distribution parameters."""
        return load_tensors(self.blobs.get(self.key(image_id, bucket)))["parameters"]


def sample_latents(
    params: torch.Tensor, generator: torch.Generator, scaling: float, shift: float = 0.0
) -> torch.Tensor:
    """Draws z ~ N(mean, std) from cached parameters and scales it as the pipeline expects (x0 of the flow)."""
    mean, logvar = params.chunk(2, dim=-3)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    z = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    return (z - shift) * scaling
