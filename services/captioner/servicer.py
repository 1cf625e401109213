"""`pony.v1.Captioner` over gRPC: converts protos to caption jobs for the VLM captioner and back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from grpc import aio

from pony.v1 import captioner_pb2, captioner_pb2_grpc, common_pb2
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.imagerefs import ImageResolver
from pony_common.metrics import ITEM_FAILURES, MODEL_INFO
from services.captioner.backend import (
    MAX_NEW_TOKENS_LIMIT,
    SERVICE,
    CaptionJob,
    CaptionOutcome,
    VlmCaptioner,
    check_kinds,
)
from services.captioner.prompts import KINDS

logger = logging.getLogger(__name__)

KIND_OF_ENUM = {
    captioner_pb2.CAPTION_KIND_SHORT: "short",
    captioner_pb2.CAPTION_KIND_MEDIUM: "medium",
    captioner_pb2.CAPTION_KIND_LONG: "long",
    captioner_pb2.CAPTION_KIND_STYLE: "style",
}
ENUM_OF_KIND = {v: k for k, v in KIND_OF_ENUM.items()}
assert set(ENUM_OF_KIND) == set(KINDS)
_MAX_TEXT = 256  # characters per tag, character or artist name
_MAX_LIST = 512  # tags per item


def _kinds(item: captioner_pb2.CaptionItem, i: int) -> list[str]:
    kinds = []
    for j, value in enumerate(item.kinds):
        if value not in KIND_OF_ENUM:
            raise InvalidArgument(
                f"items[{i}].kinds[{j}]", f"unknown caption kind {value}; use SHORT, MEDIUM, LONG or STYLE"
            )
        kinds.append(KIND_OF_ENUM[value])
    return kinds


def _strings(values: Sequence[str], field: str) -> list[str]:
    if len(values) > _MAX_LIST:
        raise InvalidArgument(field, f"{len(values)} given; at most {_MAX_LIST}")
    for j, value in enumerate(values):
        if len(value) > _MAX_TEXT:
            raise InvalidArgument(f"{field}[{j}]", f"longer than {_MAX_TEXT} characters")
    return [v for v in values if v.strip()]


class CaptionerServicer(captioner_pb2_grpc.CaptionerServicer):
    """A problem with the request as a whole (no items, too many, an unknown kind, a bad token budget, an
    oversized tag) is INVALID_ARGUMENT naming the field; a bad image of one item is that item's ItemError
    (reason "invalid_image", field `items[i].image...`) and the other items are captioned."""

    def __init__(self, settings: Settings, captioner: VlmCaptioner) -> None:
        self.settings = settings
        self.captioner = captioner
        self.resolver = ImageResolver(settings)

    def load(self) -> None:
        self.captioner.load()
        MODEL_INFO.labels(SERVICE).info(
            {
                "model": self.captioner.model_id,
                "version": self.captioner.model_version,
                "template": self.captioner.template_version,
            }
        )

    def _validate(self, items: Sequence[captioner_pb2.CaptionItem], max_new_tokens: int) -> list[dict]:
        if not items:
            raise InvalidArgument("items", "at least one item is required")
        if len(items) > self.settings.captioner.max_items:
            raise InvalidArgument("items", f"{len(items)} given; at most {self.settings.captioner.max_items} per call")
        if not 0 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument("max_new_tokens", f"must be in 0..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens}")
        specs = []
        for i, item in enumerate(items):
            specs.append(
                {
                    "kinds": check_kinds(_kinds(item, i), f"items[{i}].kinds"),
                    "tags": _strings(item.tags, f"items[{i}].tags"),
                    "characters": _strings(item.characters, f"items[{i}].characters"),
                    "artists": _strings(item.artists, f"items[{i}].artists"),
                }
            )
        return specs

    def _run(
        self,
        items: Sequence[captioner_pb2.CaptionItem],
        specs: list[dict],
        offset: int,
        max_new_tokens: int,
        context: aio.ServicerContext,
    ) -> list[captioner_pb2.CaptionResult]:
        """Loads the images (bad ones become item errors) and captions the rest in one backend call; stops between
        generation batches once the caller's deadline has passed or the call was cancelled."""
        results: list[captioner_pb2.CaptionResult] = []
        jobs: list[CaptionJob] = []
        positions: list[int] = []
        for k, (item, spec) in enumerate(zip(items, specs, strict=True)):
            result = captioner_pb2.CaptionResult(item_id=item.item_id, image_id=item.image.image_id)
            try:
                loaded = self.resolver.load(item.image, field=f"items[{offset + k}].image")
            except InvalidArgument as exc:
                ITEM_FAILURES.labels(SERVICE, "invalid_image").inc()
                result.error.CopyFrom(
                    common_pb2.ItemError(reason="invalid_image", message=exc.message, field=exc.field)
                )
            else:
                result.image_id = loaded.image_id
                jobs.append(CaptionJob(image=loaded.image, **spec))
                positions.append(k)
            results.append(result)

        def should_stop() -> bool:
            remaining = context.time_remaining()
            return context.cancelled() or (remaining is not None and remaining <= 0)

        outcomes = self.captioner.caption(jobs, max_new_tokens, should_stop) if jobs else []
        for k, outcome in zip(positions, outcomes, strict=True):
            self._fill(results[k], outcome, f"items[{offset + k}]")
        return results

    @staticmethod
    def _fill(result: captioner_pb2.CaptionResult, outcome: CaptionOutcome, field: str) -> None:
        for c in outcome.captions:
            result.captions.append(
                captioner_pb2.Caption(
                    kind=ENUM_OF_KIND[c.kind],
                    text=c.text,
                    provenance=common_pb2.Provenance(
                        model=c.model, model_version=c.model_version, component_version=c.template_version
                    ),
                )
            )
        if not outcome.ok:
            result.error.CopyFrom(
                common_pb2.ItemError(reason=outcome.error_reason, message=outcome.error_message, field=field)
            )

    async def Caption(
        self, request: captioner_pb2.CaptionRequest, context: aio.ServicerContext
    ) -> captioner_pb2.CaptionResponse:
        items = list(request.items)
        specs = self._validate(items, request.max_new_tokens)
        results = await asyncio.to_thread(self._run, items, specs, 0, request.max_new_tokens, context)
        return captioner_pb2.CaptionResponse(results=results)

    async def CaptionStream(
        self, request: captioner_pb2.CaptionStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[captioner_pb2.CaptionStreamResponse]:
        """Captions `captioner_batch_size` items at a time and sends each result as its batch finishes."""
        items = list(request.items)
        specs = self._validate(items, request.max_new_tokens)
        step = self.captioner.batch_size
        done = 0
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            results = await asyncio.to_thread(
                self._run, chunk, specs[start : start + step], start, request.max_new_tokens, context
            )
            for result in results:
                done += 1
                yield captioner_pb2.CaptionStreamResponse(result=result, done=done, total=len(items))
