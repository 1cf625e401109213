"""`pony.v1.Safety` over gRPC, transport only: protos to `SafetyInput`s for `SafetyService` and verdicts back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from grpc import aio

from pony.v1 import common_pb2, safety_pb2, safety_pb2_grpc
from pony_common.budgets import load_images
from pony_common.errors import InvalidArgument
from pony_common.fields import check_id, check_image_ref, check_names, check_text
from pony_common.grpc.auth import Role
from pony_common.imagerefs import ImageResolver
from pony_common.images import check_raw_size
from pony_common.metrics import ITEM_FAILURES
from services.safety.model import SERVICE
from services.safety.policy import BLOCK, SafetyInput, SafetyVerdict
from services.safety.service import Provenance, SafetyService


def _item_error(reason: str, exc: InvalidArgument) -> common_pb2.ItemError:
    ITEM_FAILURES.labels(SERVICE, reason).inc()
    return common_pb2.ItemError(reason=reason, message=exc.message, field=exc.field)


def _check_fields(item: safety_pb2.SafetyItem, field: str) -> None:
    """Hostile text (NUL bytes, control characters, over-long ids and names) makes the item an ItemError naming the
    field before anything of it is read or checked."""
    check_id(item.item_id, f"{field}.item_id")
    check_text(item.caption, f"{field}.caption")
    check_names(item.tags, f"{field}.tags")
    check_names(item.characters, f"{field}.characters")


class SafetyServicer(safety_pb2_grpc.SafetyServicer):
    """A problem with the request as a whole (no items, too many) is INVALID_ARGUMENT naming the field; a bad item
    (over a budget, nothing to check, an image that does not decode) is that item's ItemError and the other items
    are checked."""

    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "Check": Role.WORKER,
    }

    def __init__(self, service: SafetyService, resolver: ImageResolver) -> None:
        self.service = service
        self.resolver = resolver

    def _input(self, item: safety_pb2.SafetyItem, i: int, embedding: object = None) -> SafetyInput:
        field = f"items[{i}]"
        _check_fields(item, field)
        has_image = item.HasField("image") or embedding is not None
        if item.HasField("image") and embedding is not None:
            check_image_ref(item.image, f"{field}.image")  # not read, but its id is echoed
        result = SafetyInput(
            item_id=item.item_id,
            image_id=item.image.image_id if item.HasField("image") else "",
            caption=item.caption,
            tags=tuple(item.tags),
            characters=tuple(item.characters),
            embedding=embedding,
        )
        self.service.check_item(field, result, has_image)
        return result

    def _with_images(
        self,
        items: Sequence[safety_pb2.SafetyItem],
        inputs: list[tuple[int, SafetyInput]],
        errors: dict[int, common_pb2.ItemError],
    ) -> list[tuple[int, SafetyInput]]:
        """The checked inputs with their images: read and sized under the request's budget (over it, the request is
        refused before any pixel is decoded), then decoded; an image that does not decode is its item's error."""
        wanted = [i for i, checked in inputs if items[i].HasField("image") and checked.embedding is None]
        refs = [(f"items[{i}].image", items[i].image) for i in wanted]
        images = dict(zip(wanted, load_images(self.resolver, refs, self.service.budget, "items"), strict=True))
        out = []
        for i, checked in inputs:
            got = images.get(i)
            if isinstance(got, InvalidArgument):
                errors[i] = _item_error("invalid_image", got)
            else:
                out.append((i, checked if got is None else replace(checked, image=got.image, image_id=got.image_id)))
        return out

    async def Check(self, request: safety_pb2.CheckRequest, context: aio.ServicerContext) -> safety_pb2.CheckResponse:
        """An item with an `embedding` is classified from it: its image is not read or decoded. An embedding of
        the wrong width fails the call (INVALID_ARGUMENT naming `items[i].embedding`): the caller's model is not
        this one. An item's image may be raw RGB pixels (`image.raw`: nothing to decode); pixels whose length is not
        width * height * 3 fail the call (INVALID_ARGUMENT naming `items[i].image.raw.pixels`)."""
        self.service.check_request(len(request.items))
        embeddings = {
            i: self.service.check_embedding(item.embedding.values, f"items[{i}].embedding")
            for i, item in enumerate(request.items)
            if item.HasField("embedding")
        }
        for i, item in enumerate(request.items):  # raw pixels whose size contradicts their shape: the caller's bug
            if item.HasField("image") and item.image.WhichOneof("source") == "raw":
                raw = item.image.raw
                check_raw_size(raw.width, raw.height, len(raw.pixels), field=f"items[{i}].image.raw")

        def prepare() -> tuple[list[tuple[int, SafetyInput]], dict[int, common_pb2.ItemError]]:
            inputs: list[tuple[int, SafetyInput]] = []
            errors: dict[int, common_pb2.ItemError] = {}
            for i, item in enumerate(request.items):
                try:
                    inputs.append((i, self._input(item, i, embeddings.get(i))))
                except InvalidArgument as exc:
                    reason = (
                        "invalid_image"
                        if exc.field.endswith(".image") or ".image." in exc.field
                        else "invalid_argument"
                    )
                    errors[i] = _item_error(reason, exc)
            return self._with_images(request.items, inputs, errors), errors

        inputs, errors = await asyncio.to_thread(prepare)
        verdicts = await self.service.check_async([x for _, x in inputs]) if inputs else []
        by_index = dict(zip((i for i, _ in inputs), verdicts, strict=True))
        provenance = provenance_proto(self.service.provenance())
        results = []
        for i, item in enumerate(request.items):
            if i in errors:
                results.append(safety_pb2.SafetyResult(item_id=item.item_id, error=errors[i], provenance=provenance))
            else:
                results.append(result_proto(by_index[i], provenance))
        return safety_pb2.CheckResponse(results=results)


def provenance_proto(p: Provenance) -> common_pb2.Provenance:
    return common_pb2.Provenance(model=p.model, model_version=p.model_version, component_version=p.component_version)


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
