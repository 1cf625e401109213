"""The output safety check: every generated image goes through `pony.v1.Safety/Check` before it is returned.

`PONY_SAMPLER_SAFETY=required` (the default) fails closed: a configured safety service that is down or errs
makes the generation UNAVAILABLE, never unchecked. `off`, or an empty `PONY_SAFETY_ADDR`, skips the check and
says so in every response and in the log."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc

from pony_common.config import ConfigError, Settings
from pony_common.errors import DependencyUnavailable
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

    async def check(self, pngs: list[bytes], prompt: str, timeout: float | None = None) -> list[Verdict]:
        """One verdict per PNG. Raises DependencyUnavailable when the check cannot be made (fail closed)."""
        if not self.enabled:
            return [Verdict(True) for _ in pngs]
        from pony.v1 import common_pb2, safety_pb2

        tags = [t.strip() for t in prompt.split(",") if t.strip()]
        items = [
            safety_pb2.SafetyItem(image=common_pb2.ImageRef(data=png), caption=prompt, tags=tags, item_id=str(i))
            for i, png in enumerate(pngs)
        ]
        try:
            response = await self.client.acheck(safety_pb2.CheckRequest(items=items), timeout=timeout or 30.0)
        except grpc.aio.AioRpcError as exc:
            log.warning("safety check failed", extra={"code": exc.code().name, "details": exc.details()})
            raise DependencyUnavailable(
                f"safety service at {self.addr} could not check the images ({exc.code().name}); nothing is returned"
            ) from None
        by_id = {r.item_id: r for r in response.results}
        verdicts = []
        for i in range(len(pngs)):
            result = by_id.get(str(i))
            if result is None:
                verdicts.append(Verdict(False, [("safety.missing", "the safety service returned no result")]))
            elif result.error.reason:
                verdicts.append(Verdict(False, [("safety.error", result.error.message or result.error.reason)]))
            else:
                reasons = [(r.rule_id, r.message) for r in result.reasons]
                allowed = result.decision == safety_pb2.DECISION_ALLOW
                if not allowed and not reasons:
                    reasons = [("safety.undecided", "the safety service did not allow the image")]
                verdicts.append(Verdict(allowed, reasons, _RATINGS.get(int(result.rating), "")))
        return verdicts
