"""The text encoder's token budget of a prompt: counted with the family's real tokenizer, and met by dropping extra
tags from the end first, then shortening the descriptions (each keeps the same share of its words), never the
special tags. A prompt whose special tags alone are over the budget is kept whole and marked `over`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pony_common.prompts.base import PromptConvention, join_v7, sentence


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    tokens: int  # as the tokenizer counts them, start/end tokens included
    dropped_tags: int = 0  # extra tags left out from the end
    shortened: bool = False  # descriptions cut at a word boundary
    over: bool = False  # the special tags alone are over the budget (nothing of them was dropped)

    @property
    def cut(self) -> bool:
        return bool(self.dropped_tags or self.shortened)


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer saved with `save_pretrained` (a pipeline's `tokenizer/` folder or a CLIP model folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class TokenBudget:
    """Counts and fits prompts for one tokenizer and limit (the family's limit, or the tokenizer's if lower)."""

    def __init__(self, tokenizer: Any, convention: PromptConvention, max_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        limit = max_tokens or convention.max_tokens
        own = getattr(tokenizer, "model_max_length", None)
        if isinstance(own, int) and 0 < own < limit:
            limit = own
        self.max_tokens = limit

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]]

    def fit(
        self,
        special: Sequence[str],
        descriptions: Sequence[str | None],
        extra: Sequence[str] = (),
        *,
        tokens: int | None = None,
    ) -> FittedPrompt:
        """The prompt `special, descriptions, extra` within the budget (`tokens`: its count, when known)."""
        special = [t for t in special if t]
        texts = [sentence(d) for d in descriptions]
        extra = list(extra)
        full = join_v7(special, texts, extra)
        n = self.count(full) if tokens is None else tokens
        if n <= self.max_tokens:
            return FittedPrompt(full, n)
        # The most extra tags that fit (a prefix: they are dropped from the end).
        keep = self._largest(len(extra), lambda k: join_v7(special, texts, extra[:k]))
        if keep is not None:
            text = join_v7(special, texts, extra[:keep])
            return FittedPrompt(text, self.count(text), dropped_tags=len(extra) - keep)
        words = [t.split() for t in texts]
        most = max((len(w) for w in words), default=0)

        def shortened(m: int) -> str:
            kept = [" ".join(w[: math.ceil(len(w) * m / most)]) if most else "" for w in words]
            return join_v7(special, kept, [])

        share = self._largest(most, shortened)
        text = shortened(share or 0)
        return FittedPrompt(text, self.count(text), dropped_tags=len(extra), shortened=True, over=share is None)

    def _largest(self, top: int, build: Any) -> int | None:
        """The largest k in 0..top whose `build(k)` fits (token counts grow with k), or None if even 0 does not."""
        if self.count(build(0)) > self.max_tokens:
            return None
        lo, hi = 0, top
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(build(mid)) <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return lo


@dataclass
class TokenStats:
    """The token-length distribution of many prompts, streamed (a count per length, not every prompt)."""

    max_tokens: int
    lengths: dict[int, int] = field(default_factory=dict)
    cut: int = 0  # prompts that lost extra tags or description words to fit
    over: int = 0  # prompts whose special tags alone are over the budget

    def add(self, fitted: FittedPrompt) -> None:
        self.lengths[fitted.tokens] = self.lengths.get(fitted.tokens, 0) + 1
        self.cut += fitted.cut
        self.over += fitted.over

    @property
    def count(self) -> int:
        return sum(self.lengths.values())

    def quantile(self, q: float) -> int:
        """The smallest length with at least `q` of the prompts at or below it (0 when there are none)."""
        total, seen = self.count, 0
        for length in sorted(self.lengths):
            seen += self.lengths[length]
            if seen >= q * total:
                return length
        return 0

    def as_dict(self) -> dict[str, int]:
        lengths = sorted(self.lengths)
        return {
            "prompts": self.count,
            "max_tokens": self.max_tokens,
            "min": lengths[0] if lengths else 0,
            "median": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "max": lengths[-1] if lengths else 0,
            "cut": self.cut,
            "over": self.over,
        }

    def line(self) -> str:
        return format_token_stats(self.as_dict())


def format_token_stats(d: dict[str, int]) -> str:
    """One line of a `TokenStats.as_dict()`: min/median/p95/max and how many prompts were cut."""
    line = (
        f"prompt tokens (limit {d['max_tokens']}): min {d['min']}, median {d['median']}, p95 {d['p95']}, "
        f"max {d['max']}; {d['cut']} of {d['prompts']} prompts cut to fit"
    )
    return line + (f", {d['over']} over the limit with their special tags alone" if d["over"] else "")
