"""`pony.v1.Captioner` over gRPC, transport only: protos to caption jobs for `CaptionerService` and back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from grpc import aio

from pony.v1 import captioner_pb2, captioner_pb2_grpc, common_pb2
from pony_common.budgets import OpenedImage, decode, open_images
from pony_common.errors import InvalidArgument
from pony_common.fields import check_id, check_names
from pony_common.grpc.auth import Role
from pony_common.imagerefs import ImageResolver
from services.captioner.prompts import KINDS
from services.captioner.service import CaptionerService, CaptionJob, CaptionOutcome, CaptionSpec

logger = logging.getLogger(__name__)

KIND_OF_ENUM = {
    captioner_pb2.CAPTION_KIND_SHORT: "short",
    captioner_pb2.CAPTION_KIND_MEDIUM: "medium",
    captioner_pb2.CAPTION_KIND_LONG: "long",
    captioner_pb2.CAPTION_KIND_STYLE: "style",
}
ENUM_OF_KIND = {v: k for k, v in KIND_OF_ENUM.items()}
assert set(ENUM_OF_KIND) == set(KINDS)


def _kinds(item: captioner_pb2.CaptionItem, i: int) -> list[str]:
    kinds = []
    for j, value in enumerate(item.kinds):
        if value not in KIND_OF_ENUM:
            raise InvalidArgument(
                f"items[{i}].kinds[{j}]", f"unknown caption kind {value}; use SHORT, MEDIUM, LONG or STYLE"
            )
        kinds.append(KIND_OF_ENUM[value])
    return kinds


def _check_fields(item: captioner_pb2.CaptionItem, field: str) -> None:
    """Hostile text (NUL bytes, control characters, over-long values) is refused before anything is read."""
    check_id(item.item_id, f"{field}.item_id")
    for name in ("tags", "characters", "artists"):
        check_names(getattr(item, name), f"{field}.{name}")


class CaptionerServicer(captioner_pb2_grpc.CaptionerServicer):
    """A problem with the request as a whole (no items, too many, an unknown kind, a bad token budget, an
    oversized tag, images over the request's byte or pixel budget) is INVALID_ARGUMENT naming the field; a bad
    image of one item is that item's ItemError (reason "invalid_image", field `items[i].image...`) and the other
    items are captioned."""

    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "Caption": Role.WORKER,
        "CaptionStream": Role.WORKER,
    }

    def __init__(self, service: CaptionerService, resolver: ImageResolver) -> None:
        self.service = service
        self.resolver = resolver

    def _validate(self, items: Sequence[captioner_pb2.CaptionItem], max_new_tokens: int) -> list[CaptionSpec]:
        self.service.check_request(len(items), max_new_tokens)
        for i, item in enumerate(items):
            _check_fields(item, f"items[{i}]")
        return [
            self.service.check_item(f"items[{i}]", _kinds(item, i), item.tags, item.characters, item.artists)
            for i, item in enumerate(items)
        ]

    def _open(self, items: Sequence[captioner_pb2.CaptionItem], group: int = 0) -> list[OpenedImage | InvalidArgument]:
        """The items' images read and their headers parsed, the request refused over its byte or pixel budget
        (pixels per `group` items decoded together; all when 0) before any pixel is decoded."""
        refs = [(f"items[{i}].image", item.image) for i, item in enumerate(items)]
        return open_images(self.resolver, refs, self.service.budget, "items", group)

    def _decode(
        self,
        items: Sequence[captioner_pb2.CaptionItem],
        specs: list[CaptionSpec],
        opened: Sequence[OpenedImage | InvalidArgument],
    ) -> tuple[list[captioner_pb2.CaptionResult], list[CaptionJob], list[int]]:
        """One result per item, the opened images decoded (bad ones become item errors): the results, the jobs of
        the good images and their positions."""
        results: list[captioner_pb2.CaptionResult] = []
        jobs: list[CaptionJob] = []
        positions: list[int] = []
        for k, (item, spec) in enumerate(zip(items, specs, strict=True)):
            result = captioner_pb2.CaptionResult(item_id=item.item_id, image_id=item.image.image_id)
            try:
                loaded = decode(opened[k])
            except InvalidArgument as exc:
                self._fill(result, self.service.rejected_image(exc), exc.field)
            else:
                result.image_id = loaded.image_id
                jobs.append(spec.job(loaded.image))
                positions.append(k)
            results.append(result)
        return results, jobs, positions

    async def _run(
        self,
        items: Sequence[captioner_pb2.CaptionItem],
        specs: list[CaptionSpec],
        offset: int,
        max_new_tokens: int,
        context: aio.ServicerContext,
        opened: Sequence[OpenedImage | InvalidArgument],
    ) -> list[captioner_pb2.CaptionResult]:
        """Decodes the opened images in a thread and captions the good ones in one service call, whose model batches
        are shared with concurrent calls; work not yet started is skipped once the caller's deadline has passed or
        the call was cancelled."""
        results, jobs, positions = await asyncio.to_thread(self._decode, items, specs, opened)

        def should_stop() -> bool:
            remaining = context.time_remaining()
            return context.cancelled() or (remaining is not None and remaining <= 0)

        outcomes = await self.service.caption_async(jobs, max_new_tokens, should_stop) if jobs else []
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

        opened = await asyncio.to_thread(self._open, items)
        results = await self._run(items, specs, 0, request.max_new_tokens, context, opened)
        return captioner_pb2.CaptionResponse(results=results)

    async def CaptionStream(
        self, request: captioner_pb2.CaptionStreamRequest, context: aio.ServicerContext
    ) -> AsyncIterator[captioner_pb2.CaptionStreamResponse]:
        """Captions `captioner_batch_size` items at a time and sends each result as its chunk finishes."""
        items = list(request.items)
        specs = self._validate(items, request.max_new_tokens)
        step = self.service.batch_size
        opened = await asyncio.to_thread(self._open, items, step)
        done = 0
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            results = await self._run(
                chunk, specs[start : start + step], start, request.max_new_tokens, context, opened[start : start + step]
            )
            for result in results:
                done += 1
                yield captioner_pb2.CaptionStreamResponse(result=result, done=done, total=len(items))
