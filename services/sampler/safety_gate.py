"""The safety checks of a generation, both through `pony.v1.Safety/Check`: the prompt before any GPU work
(`check_prompt`: a prompt the rules block on its text alone is refused without generating), then every generated
image before it is returned (`check`).

The safety service compares every tag, caption and name by its `pony_common.textnorm` key (NFKC, case folding,
invisible characters removed, confusables folded to Latin, `_`/space/`-` as one); the gate sends the prompt as
written (the caption) and its comma-separated pieces cut at any comma form, as those keys (the tags), so a blocked
tag hidden behind a fullwidth comma, a zero-width space or a Cyrillic letter is what the rules see as the tag.

Images go to the check as raw RGB pixels (`ImageRef.raw`): the safety service decodes nothing, and the PNG is
encoded meanwhile (`encoding.py`), so a generated image is never decoded again.

`PONY_SAMPLER_SAFETY=required` (the default) fails closed: a configured safety service that is down or errs
makes the generation UNAVAILABLE, never unchecked. `off`, or an empty `PONY_SAFETY_ADDR`, skips the check and
says so in every response and in the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from pony_common.config import ConfigError, Settings
from pony_common.errors import DependencyUnavailable
from pony_common.fields import NAME_MAX
from pony_common.textnorm import split_tags
from services.safety.client import SafetyClient

log = logging.getLogger(__name__)

MODES = ("required", "off")
_RATINGS = {1: "safe", 2: "questionable", 3: "explicit"}


@dataclass
class Verdict:
    """One image: allowed or blocked, the reasons (rule id, message) and the rating."""

    allowed: bool
    reasons: list[tuple[str, str]] = field(default_factory=list)
    rating: str = ""


class SafetyGate:
    """Checks images (with the prompt as caption and its comma-separated parts as tags) in one Check call
    through the safety service's client."""

    def __init__(self, settings: Settings) -> None:
        if settings.sampler.safety not in MODES:
            raise ConfigError(f"PONY_SAMPLER_SAFETY must be one of {', '.join(MODES)}, got {settings.sampler.safety!r}")
        self.settings = settings
        self.addr = settings.safety_addr
        self.enabled = settings.sampler.safety == "required" and bool(self.addr)
        if settings.sampler.safety == "off":
            self.note = "safety check is off (PONY_SAMPLER_SAFETY=off): images were not checked"
        elif not self.addr:
            self.note = "no safety service configured (PONY_SAFETY_ADDR is empty): images were not checked"
        else:
            self.note = ""
        self.client = SafetyClient(settings, self.addr)

    def announce(self) -> None:
        if self.enabled:
            log.info("output safety check on", extra={"safety_addr": self.addr})
        else:
            log.warning("output safety check OFF: %s", self.note)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _items(self, prompt: str, images: Sequence[np.ndarray | bytes]) -> list[Any]:
        """One SafetyItem per image (or one text-only item when there are none): the prompt and its tag keys. An
        [H, W, 3] uint8 array goes as raw pixels (`ImageRef.raw`), bytes as an encoded image (`ImageRef.data`)."""
        from pony.v1 import safety_pb2

        # A piece longer than a tag may be (a sentence without commas) is not a tag: the safety service would refuse
        # the item over it. The service still splits the caption (the prompt) itself, so every piece is matched.
        tags = [tag for tag in split_tags(prompt) if len(tag) <= NAME_MAX]
        if not images:
            return [safety_pb2.SafetyItem(caption=prompt, tags=tags, item_id="0")]
        return [
            safety_pb2.SafetyItem(image=image_ref(image), caption=prompt, tags=tags, item_id=str(i))
            for i, image in enumerate(images)
        ]

    async def _check(self, items: list[Any], what: str, timeout: float | None) -> list[Verdict]:
        """One verdict per item (`what`: "prompt" or "images"). Raises DependencyUnavailable when the check cannot
        be made (fail closed)."""
        from pony.v1 import safety_pb2

        try:
            response = await self.client.acheck(safety_pb2.CheckRequest(items=items), timeout=timeout or 30.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("safety check failed", extra={"code": exc.code().name, "details": exc.details()})
            raise DependencyUnavailable(
                f"safety service at {self.addr} could not check the {what} ({exc.code().name}); nothing is returned"
            ) from None
        by_id = {r.item_id: r for r in response.results}
        noun = "prompt" if what == "prompt" else "image"
        verdicts = []
        for i in range(len(items)):
            result = by_id.get(str(i))
            if result is None:
                verdicts.append(Verdict(False, [("safety.missing", "the safety service returned no result")]))
            elif result.error.reason:
                verdicts.append(Verdict(False, [("safety.error", result.error.message or result.error.reason)]))
            else:
                reasons = [(r.rule_id, r.message) for r in result.reasons]
                allowed = result.decision == safety_pb2.DECISION_ALLOW
                if not allowed and not reasons:
                    reasons = [("safety.undecided", f"the safety service did not allow the {noun}")]
                verdicts.append(Verdict(allowed, reasons, _RATINGS.get(int(result.rating), "")))
        return verdicts

    async def check_prompt(self, prompt: str, timeout: float | None = None) -> Verdict:
        """The verdict on `prompt` by its text alone (tag rules, codex rules on the rating its tags give), asked
        before generating: whatever it blocks, the image check would block too, so a refused prompt costs no GPU.
        Raises DependencyUnavailable when the check cannot be made (fail closed)."""
        if not self.enabled:
            return Verdict(True)
        (verdict,) = await self._check(self._items(prompt, []), "prompt", timeout)
        return verdict

    async def check(
        self, images: Sequence[np.ndarray | bytes], prompt: str, timeout: float | None = None
    ) -> list[Verdict]:
        """One verdict per image ([H, W, 3] uint8 pixels, sent raw; or encoded bytes). Raises DependencyUnavailable
        when the check cannot be made (fail closed)."""
        if not self.enabled:
            return [Verdict(True) for _ in images]
        return await self._check(self._items(prompt, images), "images", timeout)


def image_ref(image: np.ndarray | bytes) -> Any:
    """A `pony.v1.ImageRef`: raw RGB pixels for an [H, W, 3] uint8 array (nothing to decode), data for bytes."""
    from pony.v1 import common_pb2

    if isinstance(image, bytes | bytearray):
        return common_pb2.ImageRef(data=bytes(image))
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got shape {pixels.shape}")
    height, width, _ = pixels.shape
    return common_pb2.ImageRef(raw=common_pb2.RawImage(width=width, height=height, pixels=pixels.tobytes()))
