"""`pony.v1.Sampler` over gRPC, transport only: protos <-> the SamplerService's domain objects; deadlines and
cancellation reach Triton."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from PIL import Image

from pony.v1 import common_pb2, safety_pb2, sampler_pb2, sampler_pb2_grpc
from pony_common.errors import InvalidArgument
from pony_common.fields import NAME_MAX, URI_MAX, check_id, check_text
from pony_common.grpc.auth import Role
from services.sampler.adapters import Adapter
from services.sampler.generation import AdapterRequest, GenerationInput, GenerationResult, GenerationSpec, Progress
from services.sampler.model import VersionInfo
from services.sampler.prompts import PromptTags
from services.sampler.service import FamilyInfo, Job, SamplerService
from services.sampler.store import BLOCKED, CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

RATING_NAMES = {common_pb2.RATING_SAFE: "safe", common_pb2.RATING_QUESTIONABLE: "questionable"}
RATING_NAMES[common_pb2.RATING_EXPLICIT] = "explicit"
RATING_ENUMS = {name: value for value, name in RATING_NAMES.items()}
JOB_STATES = {
    QUEUED: sampler_pb2.JOB_STATE_QUEUED,
    RUNNING: sampler_pb2.JOB_STATE_RUNNING,
    SUCCEEDED: sampler_pb2.JOB_STATE_SUCCEEDED,
    FAILED: sampler_pb2.JOB_STATE_FAILED,
    CANCELLED: sampler_pb2.JOB_STATE_CANCELLED,
    BLOCKED: sampler_pb2.JOB_STATE_BLOCKED,
}
VERSION_STATES = {
    "READY": sampler_pb2.VERSION_STATE_READY,
    "LOADING": sampler_pb2.VERSION_STATE_LOADING,
    "UNLOADING": sampler_pb2.VERSION_STATE_UNLOADING,
    "UNLOADED": sampler_pb2.VERSION_STATE_UNLOADED,
    "UNAVAILABLE": sampler_pb2.VERSION_STATE_FAILED,
}


def input_from_proto(req: sampler_pb2.GenerateRequest) -> GenerationInput:
    check_text(req.prompt, "prompt")  # its length is the validator's prompt budget
    check_text(req.negative_prompt, "negative_prompt")
    check_text(req.tags.source, "tags.source", NAME_MAX, multiline=False)
    check_text(req.tags.style_family, "tags.style_family", NAME_MAX, multiline=False)
    check_text(req.model, "model", NAME_MAX, multiline=False)
    if req.tags.rating and req.tags.rating not in RATING_NAMES:
        raise InvalidArgument("tags.rating", f"unknown rating {req.tags.rating}")
    tags = PromptTags(
        score=req.tags.score if req.tags.HasField("score") else None,
        style_clusters=tuple(req.tags.style_clusters),
        source=req.tags.source.strip().lower(),
        rating=RATING_NAMES.get(req.tags.rating, ""),
        palette=tuple(c.strip().lower() for c in req.tags.palette),
        style_family=req.tags.style_family.strip(),
    )
    return GenerationInput(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        width=req.width,
        height=req.height,
        steps=req.steps,
        guidance=req.guidance if req.HasField("guidance") else None,
        seed=req.seed if req.HasField("seed") else None,
        num_images=req.num_images,
        tags=tags,
        raw_prompt=req.raw_prompt,
        preview=req.preview,
        model=req.model.strip(),
        model_version=req.model_version,
        adapters=tuple(adapters_from_proto(req.adapters)),
    )


def adapters_from_proto(refs: Any) -> list[AdapterRequest]:
    out = []
    for i, ref in enumerate(refs):
        check_text(ref.name, f"adapters[{i}].name", NAME_MAX, multiline=False)
        weight = ref.weight if ref.HasField("weight") else None
        out.append(AdapterRequest(name=ref.name.strip(), version=ref.version, weight=weight))
    return out


def adapter_to_proto(adapter: Adapter) -> sampler_pb2.Adapter:
    return sampler_pb2.Adapter(
        name=adapter.name,
        version=adapter.version,
        family=adapter.family,
        uri=adapter.uri,
        sha256=adapter.sha256,
        rank=adapter.rank,
        alpha=adapter.alpha,
        run_id=adapter.run_id,
    )


def result_to_proto(result: GenerationResult) -> sampler_pb2.GenerateResponse:
    spec = result.spec
    return sampler_pb2.GenerateResponse(
        images=[
            sampler_pb2.GeneratedImage(
                png=img.png,
                seed=img.seed,
                image_id=img.image_id,
                width=img.width,
                height=img.height,
                rating=RATING_ENUMS.get(img.rating, common_pb2.RATING_UNSPECIFIED),
            )
            for img in result.images
        ],
        blocked=[
            sampler_pb2.BlockedImage(
                seed=b.seed, reasons=[safety_pb2.Reason(rule_id=rule, message=msg) for rule, msg in b.reasons]
            )
            for b in result.blocked
        ],
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        width=spec.width,
        height=spec.height,
        steps=spec.steps,
        guidance=spec.guidance,
        seed=spec.seed,
        provenance=common_pb2.Provenance(model=spec.model, model_version=result.model_version),
        safety=sampler_pb2.SAFETY_STATUS_CHECKED if result.safety_checked else sampler_pb2.SAFETY_STATUS_NOT_CHECKED,
        safety_note=result.safety_note,
        batch_size=result.batch_size,
        model=spec.model,
        adapters=[sampler_pb2.AdapterRef(name=a.name, version=a.version, weight=a.weight) for a in spec.adapters],
        model_hash=result.model_hash,
    )


def progress_to_proto(event: Progress) -> sampler_pb2.Progress:
    preview = b""
    if event.previews:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(event.previews[0]), "RGB").save(buf, format="PNG")
        preview = buf.getvalue()
    return sampler_pb2.Progress(step=event.step, total=event.total, preview_png=preview)


def version_to_proto(info: VersionInfo) -> sampler_pb2.ModelVersion:
    return sampler_pb2.ModelVersion(
        model=info.model,
        version=info.version,
        uri=info.uri,
        state=VERSION_STATES.get(info.state, sampler_pb2.VERSION_STATE_UNSPECIFIED),
        active=info.active,
        reason=info.reason,
        candidate=info.candidate,
    )


def family_to_proto(info: FamilyInfo) -> sampler_pb2.ModelFamily:
    family, limits = info.family, info.family.limits
    return sampler_pb2.ModelFamily(
        name=family.name,
        pipeline=family.pipeline,
        prompt_convention=family.convention.name,
        defaults=sampler_pb2.ModelDefaults(
            width=limits.width,
            height=limits.height,
            steps=limits.steps,
            guidance=limits.guidance,
            negative_prompt=limits.negative_prompt,
            max_width=limits.max_width,
            max_height=limits.max_height,
            max_steps=limits.max_steps,
            max_guidance=limits.max_guidance,
            max_images=limits.max_images,
            max_prompt_tokens=limits.max_prompt_tokens,
        ),
        versions=[version_to_proto(v) for v in info.versions],
        adapters=[adapter_to_proto(a) for a in info.adapters],
        is_default=family.is_default,
    )


def _timestamp(value: Any) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def job_to_proto(job: Job) -> sampler_pb2.Job:
    record = job.record
    out = sampler_pb2.Job(
        job_id=record.id,
        state=JOB_STATES.get(record.state, sampler_pb2.JOB_STATE_UNSPECIFIED),
        priority=record.priority,
        progress_step=record.progress_step,
        progress_total=record.progress_total,
        request=json_format.ParseDict(record.request, sampler_pb2.GenerateRequest(), ignore_unknown_fields=True),
        error=record.error,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
    )
    if record.result.get("response"):
        out.result.CopyFrom(
            json_format.ParseDict(record.result["response"], sampler_pb2.GenerateResponse(), ignore_unknown_fields=True)
        )
        for image, png in zip(out.result.images, job.pngs, strict=False):
            image.png = png
    return out


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    """Thin: converts, calls the SamplerService, converts back."""

    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "Generate": Role.GENERATE,
        "GenerateStream": Role.GENERATE,
        "SubmitJob": Role.GENERATE,
        "GetJob": Role.GENERATE,
        "WatchJob": Role.GENERATE,
        "CancelJob": Role.GENERATE,
        "ListVersions": Role.GENERATE,
        "ListModels": Role.GENERATE,
        "LoadVersion": Role.ADMIN,
        "PromoteVersion": Role.ADMIN,
        "DiscardVersion": Role.ADMIN,
        "RegisterAdapter": Role.ADMIN,
        "RemoveAdapter": Role.ADMIN,
    }

    def __init__(self, service: SamplerService) -> None:
        self.service = service

    # --- generation ---

    async def _spec(self, request: sampler_pb2.GenerateRequest) -> GenerationSpec:
        """Validated in a worker thread: the field scans and tokenizing are CPU work on texts as long as a message
        allows, and the event loop (health checks, other calls) must not wait on them."""
        return await asyncio.to_thread(lambda: self.service.spec(input_from_proto(request)))

    async def Generate(self, request: sampler_pb2.GenerateRequest, context: aio.ServicerContext) -> Any:
        spec = await self._spec(request)
        result = await self.service.generate(spec, timeout=context.time_remaining())
        return result_to_proto(result)

    async def GenerateStream(self, request: sampler_pb2.GenerateStreamRequest, context: aio.ServicerContext) -> Any:
        spec = await self._spec(request.request)
        priority = request.priority if request.HasField("priority") else None
        async for event in self.service.run(spec, timeout=context.time_remaining(), priority=priority):
            if isinstance(event, Progress):
                yield sampler_pb2.GenerateStreamResponse(progress=progress_to_proto(event))
            else:
                yield sampler_pb2.GenerateStreamResponse(result=result_to_proto(event))

    # --- jobs ---

    async def SubmitJob(self, request: sampler_pb2.SubmitJobRequest, context: aio.ServicerContext) -> Any:
        spec = await self._spec(request.request)
        generate = sampler_pb2.GenerateRequest()
        generate.CopyFrom(request.request)
        generate.seed = spec.seed  # a retried job draws the same images
        for ref, adapter in zip(generate.adapters, spec.adapters, strict=True):
            ref.version = adapter.version  # and with the adapter versions resolved now
        priority = request.priority if request.HasField("priority") else None
        payload = json_format.MessageToDict(generate, preserving_proto_field_name=True)
        job = await self.service.submit_job(payload, priority)
        return sampler_pb2.SubmitJobResponse(job=job_to_proto(job))

    async def GetJob(self, request: sampler_pb2.GetJobRequest, context: aio.ServicerContext) -> Any:
        check_id(request.job_id, "job_id")
        job = await self.service.get_job(request.job_id, with_images=not request.omit_images)
        return sampler_pb2.GetJobResponse(job=job_to_proto(job))

    async def WatchJob(self, request: sampler_pb2.WatchJobRequest, context: aio.ServicerContext) -> Any:
        check_id(request.job_id, "job_id")
        watch = self.service.watch_job(
            request.job_id, after_event_id=request.after_event_id, with_images=not request.omit_images
        )
        async for job, event in watch:
            yield sampler_pb2.WatchJobResponse(job=job_to_proto(job), event_id=event.id)

    async def CancelJob(self, request: sampler_pb2.CancelJobRequest, context: aio.ServicerContext) -> Any:
        check_id(request.job_id, "job_id")
        job = await self.service.cancel_job(request.job_id)
        return sampler_pb2.CancelJobResponse(job=job_to_proto(job))

    # --- versions ---

    async def LoadVersion(self, request: sampler_pb2.LoadVersionRequest, context: aio.ServicerContext) -> Any:
        check_text(request.uri, "uri", URI_MAX, multiline=False)
        check_id(request.source_run_id, "source_run_id")
        check_text(request.model, "model", NAME_MAX, multiline=False)
        info = await self.service.load_version(
            request.uri, request.source_run_id, request.model.strip(), candidate=request.candidate
        )
        return sampler_pb2.LoadVersionResponse(version=version_to_proto(info))

    async def PromoteVersion(self, request: sampler_pb2.PromoteVersionRequest, context: aio.ServicerContext) -> Any:
        check_text(request.model, "model", NAME_MAX, multiline=False)
        info = await self.service.promote_version(request.model.strip(), request.version)
        return sampler_pb2.PromoteVersionResponse(version=version_to_proto(info))

    async def DiscardVersion(self, request: sampler_pb2.DiscardVersionRequest, context: aio.ServicerContext) -> Any:
        check_text(request.model, "model", NAME_MAX, multiline=False)
        check_text(request.reason, "reason", URI_MAX)
        info = await self.service.discard_version(request.model.strip(), request.version, request.reason)
        return sampler_pb2.DiscardVersionResponse(version=version_to_proto(info))

    async def ListVersions(self, request: sampler_pb2.ListVersionsRequest, context: aio.ServicerContext) -> Any:
        check_text(request.model, "model", NAME_MAX, multiline=False)
        versions = await self.service.list_versions(request.model.strip())
        return sampler_pb2.ListVersionsResponse(versions=[version_to_proto(v) for v in versions])

    async def ListModels(self, request: sampler_pb2.ListModelsRequest, context: aio.ServicerContext) -> Any:
        families = await self.service.list_models()
        return sampler_pb2.ListModelsResponse(models=[family_to_proto(f) for f in families])

    # --- adapters ---

    async def RegisterAdapter(self, request: sampler_pb2.RegisterAdapterRequest, context: aio.ServicerContext) -> Any:
        check_text(request.name, "name", NAME_MAX, multiline=False)
        check_text(request.family, "family", NAME_MAX, multiline=False)
        check_text(request.uri, "uri", URI_MAX, multiline=False)
        adapter = await self.service.register_adapter(request.name, request.uri, request.family)
        return sampler_pb2.RegisterAdapterResponse(adapter=adapter_to_proto(adapter))

    async def RemoveAdapter(self, request: sampler_pb2.RemoveAdapterRequest, context: aio.ServicerContext) -> Any:
        check_text(request.name, "name", NAME_MAX, multiline=False)
        removed = await self.service.remove_adapter(request.name, request.version)
        return sampler_pb2.RemoveAdapterResponse(removed=[adapter_to_proto(a) for a in removed])
