"""`pony.v1.Sampler` over gRPC: protos <-> the sampler's domain objects; deadlines and cancellation reach Triton."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from PIL import Image

from pony.v1 import common_pb2, safety_pb2, sampler_pb2, sampler_pb2_grpc
from pony_common.blobs import BlobStore
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, InvalidArgument
from services.sampler import jobs as job_states
from services.sampler.backend import VersionInfo
from services.sampler.generation import MODEL_NAME, GenerationInput, GenerationResult, Progress
from services.sampler.jobs import JobRecord, JobStore
from services.sampler.prompts import PromptTags
from services.sampler.sampler import Sampler

log = logging.getLogger(__name__)

RATING_NAMES = {common_pb2.RATING_SAFE: "safe", common_pb2.RATING_QUESTIONABLE: "questionable"}
RATING_NAMES[common_pb2.RATING_EXPLICIT] = "explicit"
RATING_ENUMS = {name: value for value, name in RATING_NAMES.items()}
JOB_STATES = {
    job_states.QUEUED: sampler_pb2.JOB_STATE_QUEUED,
    job_states.RUNNING: sampler_pb2.JOB_STATE_RUNNING,
    job_states.SUCCEEDED: sampler_pb2.JOB_STATE_SUCCEEDED,
    job_states.FAILED: sampler_pb2.JOB_STATE_FAILED,
    job_states.CANCELLED: sampler_pb2.JOB_STATE_CANCELLED,
    job_states.BLOCKED: sampler_pb2.JOB_STATE_BLOCKED,
}
VERSION_STATES = {
    "READY": sampler_pb2.VERSION_STATE_READY,
    "LOADING": sampler_pb2.VERSION_STATE_LOADING,
    "UNLOADING": sampler_pb2.VERSION_STATE_UNLOADING,
    "UNLOADED": sampler_pb2.VERSION_STATE_UNLOADED,
    "UNAVAILABLE": sampler_pb2.VERSION_STATE_FAILED,
}
WATCH_POLL_S = 0.2


def input_from_proto(req: sampler_pb2.GenerateRequest) -> GenerationInput:
    if req.tags.rating and req.tags.rating not in RATING_NAMES:
        raise InvalidArgument("tags.rating", f"unknown rating {req.tags.rating}")
    tags = PromptTags(
        score=req.tags.score if req.tags.HasField("score") else None,
        style_clusters=tuple(req.tags.style_clusters),
        source=req.tags.source.strip().lower(),
        rating=RATING_NAMES.get(req.tags.rating, ""),
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
        provenance=common_pb2.Provenance(model=MODEL_NAME, model_version=result.model_version),
        safety=sampler_pb2.SAFETY_STATUS_CHECKED if result.safety_checked else sampler_pb2.SAFETY_STATUS_NOT_CHECKED,
        safety_note=result.safety_note,
        batch_size=result.batch_size,
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
        model=MODEL_NAME,
        version=info.version,
        uri=info.uri,
        state=VERSION_STATES.get(info.state, sampler_pb2.VERSION_STATE_UNSPECIFIED),
        active=info.active,
        reason=info.reason,
    )


def _timestamp(value: Any) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class SamplerServicer(sampler_pb2_grpc.SamplerServicer):
    """Thin: converts, calls the Sampler / JobStore, converts back."""

    def __init__(self, settings: Settings, sampler: Sampler) -> None:
        self.settings = settings
        self.sampler = sampler
        self._jobs: JobStore | None = None
        self._blobs: BlobStore | None = None

    # --- generation ---

    def _spec(self, request: sampler_pb2.GenerateRequest):  # type: ignore[no-untyped-def]
        if not self.sampler.ready:
            raise DependencyUnavailable("the sampler is still loading its model")
        return self.sampler.spec(input_from_proto(request))

    async def Generate(self, request: sampler_pb2.GenerateRequest, context: aio.ServicerContext) -> Any:
        spec = self._spec(request)
        result = await self.sampler.generate(spec, timeout=context.time_remaining())
        return result_to_proto(result)

    async def GenerateStream(self, request: sampler_pb2.GenerateStreamRequest, context: aio.ServicerContext) -> Any:
        spec = self._spec(request.request)
        async for event in self.sampler.run(spec, timeout=context.time_remaining()):
            if isinstance(event, Progress):
                yield sampler_pb2.GenerateStreamResponse(progress=progress_to_proto(event))
            else:
                yield sampler_pb2.GenerateStreamResponse(result=result_to_proto(event))

    # --- jobs ---

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            from pony_common.catalog import catalog_for

            self._jobs = JobStore(catalog_for(self.settings.database_url))
        return self._jobs

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = BlobStore(self.settings.blob_url)
        return self._blobs

    def _job_proto(self, record: JobRecord, omit_images: bool = False) -> sampler_pb2.Job:
        job = sampler_pb2.Job(
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
            job.result.CopyFrom(
                json_format.ParseDict(
                    record.result["response"], sampler_pb2.GenerateResponse(), ignore_unknown_fields=True
                )
            )
            if not omit_images:
                for image, key in zip(job.result.images, record.result.get("blob_keys", []), strict=False):
                    image.png = self.blobs.get(key)
        return job

    async def SubmitJob(self, request: sampler_pb2.SubmitJobRequest, context: aio.ServicerContext) -> Any:
        from services.sampler.tasks import enqueue

        spec = self._spec(request.request)
        generate = sampler_pb2.GenerateRequest()
        generate.CopyFrom(request.request)
        generate.seed = spec.seed  # a retried job draws the same images
        priority = request.priority if request.HasField("priority") else None
        payload = json_format.MessageToDict(generate, preserving_proto_field_name=True)
        record = await asyncio.to_thread(self.jobs.create, payload, priority)
        await asyncio.to_thread(enqueue, self.settings, self.jobs, record)
        return sampler_pb2.SubmitJobResponse(job=self._job_proto(record))

    async def GetJob(self, request: sampler_pb2.GetJobRequest, context: aio.ServicerContext) -> Any:
        record = await asyncio.to_thread(self.jobs.get, request.job_id)
        job = await asyncio.to_thread(self._job_proto, record, request.omit_images)
        return sampler_pb2.GetJobResponse(job=job)

    async def WatchJob(self, request: sampler_pb2.WatchJobRequest, context: aio.ServicerContext) -> Any:
        seen: tuple[Any, ...] | None = None
        while True:
            record = await asyncio.to_thread(self.jobs.get, request.job_id)
            key = (record.state, record.progress_step, record.progress_total, record.error)
            if key != seen:
                seen = key
                job = await asyncio.to_thread(self._job_proto, record, request.omit_images)
                yield sampler_pb2.WatchJobResponse(job=job)
            if record.done:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def CancelJob(self, request: sampler_pb2.CancelJobRequest, context: aio.ServicerContext) -> Any:
        record = await asyncio.to_thread(self.jobs.cancel, request.job_id)
        log.info("job cancel", extra={"job_id": record.id, "state": record.state})
        return sampler_pb2.CancelJobResponse(job=await asyncio.to_thread(self._job_proto, record, True))

    # --- versions ---

    async def LoadVersion(self, request: sampler_pb2.LoadVersionRequest, context: aio.ServicerContext) -> Any:
        if not self.sampler.ready:
            raise DependencyUnavailable("the sampler is still loading its model")
        info = await asyncio.to_thread(self.sampler.load_version, request.uri, request.source_run_id)
        return sampler_pb2.LoadVersionResponse(version=version_to_proto(info))

    async def ListVersions(self, request: sampler_pb2.ListVersionsRequest, context: aio.ServicerContext) -> Any:
        versions = await asyncio.to_thread(self.sampler.backend.list_versions)
        return sampler_pb2.ListVersionsResponse(versions=[version_to_proto(v) for v in versions])
