"""`pony.v1.Safety` over gRPC: converts protos to and from the `SafetyChecker` backend's domain objects."""

from __future__ import annotations

import asyncio

from grpc import aio

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, InvalidArgument
from pony_common.imagerefs import ImageResolver
from pony_common.metrics import ITEM_FAILURES
from services.safety.checker import SERVICE, SafetyChecker
from services.safety.policy import BLOCK, SafetyInput, SafetyVerdict

MAX_CAPTION_CHARS = 20_000
MAX_NAMES = 1024


def _item_error(reason: str, exc: InvalidArgument) -> common_pb2.ItemError:
    ITEM_FAILURES.labels(SERVICE, reason).inc()
    return common_pb2.ItemError(reason=reason, message=exc.message, field=exc.field)


class SafetyServicer(safety_pb2_grpc.SafetyServicer):
    def __init__(self, settings: Settings, backend: SafetyChecker) -> None:
        self.settings = settings
        self.backend = backend
        self.resolver = ImageResolver(settings)

    def _input(self, item: safety_pb2.SafetyItem, i: int) -> SafetyInput:
        field = f"items[{i}]"
        if len(item.caption) > MAX_CAPTION_CHARS:
            raise InvalidArgument(f"{field}.caption", f"longer than {MAX_CAPTION_CHARS} characters")
        for name in ("tags", "characters"):
            if len(getattr(item, name)) > MAX_NAMES:
                raise InvalidArgument(f"{field}.{name}", f"more than {MAX_NAMES} entries")
        image, image_id = None, item.image.image_id if item.HasField("image") else ""
        if item.HasField("image"):
            loaded = self.resolver.load(item.image, f"{field}.image")
            image, image_id = loaded.image, loaded.image_id
        result = SafetyInput(
            item_id=item.item_id,
            image_id=image_id,
            caption=item.caption,
            tags=tuple(item.tags),
            characters=tuple(item.characters),
            image=image,
        )
        if result.empty:
            raise InvalidArgument(field, "needs an image, a caption, tags or character names")
        return result

    async def Check(self, request: safety_pb2.CheckRequest, context: aio.ServicerContext) -> safety_pb2.CheckResponse:
        if not self.backend.ready:
            raise DependencyUnavailable("the safety service is still loading its model")
        if not request.items:
            raise InvalidArgument("items", "at least one item is required")
        if len(request.items) > self.settings.safety.max_batch:
            raise InvalidArgument(
                "items", f"at most {self.settings.safety.max_batch} items per call, got {len(request.items)}"
            )

        def work() -> safety_pb2.CheckResponse:
            inputs: list[tuple[int, SafetyInput]] = []
            errors: dict[int, common_pb2.ItemError] = {}
            for i, item in enumerate(request.items):
                try:
                    inputs.append((i, self._input(item, i)))
                except InvalidArgument as exc:
                    reason = (
                        "invalid_image"
                        if exc.field.endswith(".image") or ".image." in exc.field
                        else "invalid_argument"
                    )
                    errors[i] = _item_error(reason, exc)
            verdicts = self.backend.check([x for _, x in inputs]) if inputs else []
            by_index = dict(zip((i for i, _ in inputs), verdicts, strict=True))
            provenance = common_pb2.Provenance(
                model=self.backend.model_id,
                model_version=self.backend.model_version,
                component_version=self.backend.component_version,
            )
            results = []
            for i, item in enumerate(request.items):
                if i in errors:
                    results.append(
                        safety_pb2.SafetyResult(item_id=item.item_id, error=errors[i], provenance=provenance)
                    )
                else:
                    results.append(result_proto(by_index[i], provenance))
            return safety_pb2.CheckResponse(results=results)

        return await asyncio.to_thread(work)


def result_proto(v: SafetyVerdict, provenance: common_pb2.Provenance) -> safety_pb2.SafetyResult:
    return safety_pb2.SafetyResult(
        item_id=v.item_id,
        image_id=v.image_id,
        rating=int(v.rating),
        rating_scores=list(v.rating_scores),
        flags=v.flags,
        decision=safety_pb2.DECISION_BLOCK if v.decision == BLOCK else safety_pb2.DECISION_ALLOW,
        reasons=[safety_pb2.Reason(rule_id=r.rule_id, message=r.message) for r in v.reasons],
        codex_version=str(v.codex_version),
        unknown_characters=v.unknown_characters,
        provenance=provenance,
        matched_characters=v.matched_characters,
    )
