"""CLIP's text tower + projection, in the evaluating process: L2-normalised text embeddings of the content prompts,
in the same space as the scorer's image embeddings (the same CLIP weights, `settings.model_path("scorer")`).

Why in-process: no service answers text embeddings (the scorer and style tagger embed images only), and adding an
RPC would change another deployable's API for a handful of prompts per evaluation; the text tower is the small half
of CLIP (ViT-L/14: 123 M parameters) and runs once per content prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, CLIPModel

from pony_common.models.loading import model_load_lock


class ClipTextTower:
    """Loads on first use; `embed(texts)` -> (n, dim) float32 L2-normalised, on the CPU."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        self.path = path
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._text: torch.nn.Module | None = None
        self._projection: torch.nn.Module | None = None
        self._tokenizer = None
        self._max_length = 77

    def load(self) -> None:
        if self._text is not None:
            return
        with model_load_lock, self._lock:
            if self._text is not None:
                return
            model = CLIPModel.from_pretrained(self.path)
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._max_length = int(model.config.text_config.max_position_embeddings)
            self._projection = model.text_projection.to(self.device).eval().requires_grad_(False)
            self._text = model.text_model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        self.load()
        assert self._projection is not None
        return int(self._projection.out_features)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        self.load()
        assert self._text is not None and self._projection is not None and self._tokenizer is not None
        if not texts:
            return torch.empty(0, self.dim)
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            pooled = self._text(
                input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
            ).pooler_output
            emb = self._projection(pooled).to(torch.float32)
            return torch.nn.functional.normalize(emb, dim=-1).cpu()
