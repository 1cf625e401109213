"""The sampler's logic, transport-free: one generation end to end (validate, stream from Triton, encode PNGs with
their parameters, check them for safety, keep only what may be returned), asynchronous jobs and model versions."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pony_common.access import confine_model_uri
from pony_common.blobs import BlobStore
from pony_common.catalog import catalog_for
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, InvalidArgument
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES, SAMPLER_COMPUTE, SAMPLER_QUEUE_WAIT
from services.sampler.generation import (
    BlockedOutput,
    Generated,
    GenerationInput,
    GenerationResult,
    GenerationSpec,
    OutputImage,
    Progress,
)
from services.sampler.model import SamplerModel, VersionInfo
from services.sampler.pnginfo import encode_png
from services.sampler.repository import MODEL_NAME
from services.sampler.safety_gate import SafetyGate
from services.sampler.store import JobEvent, JobRecord, JobStore, VersionCatalog
from services.sampler.validation import RequestValidator

log = logging.getLogger(__name__)

WATCH_POLL_S = 0.2  # how often a watch looks for new events once it has replayed the log (it misses none)


@dataclass(frozen=True)
class Job:
    """A generation job as callers see it: its record and, unless left out, its images' PNGs from the blob store."""

    record: JobRecord
    pngs: list[bytes] = field(default_factory=list)


class SamplerService:
    """Generation over a SamplerModel (Triton) and a SafetyGate; jobs and versions in the catalog."""

    def __init__(self, settings: Settings, model: SamplerModel, gate: SafetyGate) -> None:
        self.settings = settings
        self.model = model
        self.gate = gate
        self.versions: VersionCatalog | None = None
        self._validator: RequestValidator | None = None
        self._jobs: JobStore | None = None
        self._blobs: BlobStore | None = None

    # --- lifecycle ---

    def load(self) -> None:
        """Catalog versions -> repository, the model (tokenizer, Triton), repository -> catalog; blocking."""
        self.versions = VersionCatalog(catalog_for(self.settings.database_url))
        self.versions.import_published(self.model.repository)
        self.model.load()
        self.versions.record_repository(self.model.repository)
        self._validator = RequestValidator(self.settings, self.model.tokenizer)
        self.gate.announce()

    def close(self) -> None:
        self.model.teardown()

    # --- generation ---

    def spec(self, given: GenerationInput) -> GenerationSpec:
        """The validated generation (defaults filled, seed drawn when not given), or InvalidArgument(field).
        Blocking CPU work (tokenizing): async callers run it in a worker thread."""
        self.model.require_ready()
        if self._validator is None:
            raise DependencyUnavailable("the sampler is still loading its model")
        return self._validator.spec(given)

    async def run(
        self, spec: GenerationSpec, timeout: float | None = None
    ) -> AsyncIterator[Progress | GenerationResult]:
        """Progress events, then the GenerationResult (after the safety check). A prompt the safety rules block on
        its text alone is refused before any GPU work: a result with no images, every seed blocked with the rules'
        reasons, as a blocked image is (so callers, jobs (state `blocked`) and the CLI read one shape)."""
        refusal = await self.gate.check_prompt(spec.prompt, timeout)
        if not refusal.allowed:
            yield self.refused(spec, refusal.reasons)
            return
        generated: Generated | None = None
        async for event in self.model.stream(spec, timeout):
            if isinstance(event, Progress):
                yield event
            else:
                generated = event
        if generated is None:
            raise DependencyUnavailable("Triton returned no images")
        yield await self.finish(spec, generated, timeout)

    async def generate(self, spec: GenerationSpec, timeout: float | None = None) -> GenerationResult:
        result: GenerationResult | None = None
        async for event in self.run(spec, timeout):
            if isinstance(event, GenerationResult):
                result = event
        assert result is not None
        return result

    def refused(self, spec: GenerationSpec, reasons: list[tuple[str, str]]) -> GenerationResult:
        """The result of a prompt refused before generating: each of its seeds blocked, the reasons marked as the
        prompt's; no model version, since no model ran."""
        ITEM_FAILURES.labels("sampler", "prompt_blocked").inc(spec.num_images)
        log.info("prompt refused before generation", extra={"reasons": [r[0] for r in reasons]})
        why = [(rule, f"prompt refused before generation: {message}") for rule, message in reasons]
        return GenerationResult(
            spec=spec,
            images=[],
            blocked=[BlockedOutput(seed=spec.seed + i, reasons=why) for i in range(spec.num_images)],
            model_version="",
            batch_size=0,
            safety_checked=True,
            safety_note=self.gate.note,
        )

    async def finish(self, spec: GenerationSpec, generated: Generated, timeout: float | None) -> GenerationResult:
        BATCH_SIZE.labels("sampler", "triton").observe(generated.batch_size)
        SAMPLER_COMPUTE.labels(MODEL_NAME).observe(generated.compute_s)
        # Queue wait as the sampler can see it: the request's time in Triton less the model's compute.
        SAMPLER_QUEUE_WAIT.labels(MODEL_NAME).observe(max(0.0, generated.elapsed_s - generated.compute_s))
        pngs = await asyncio.to_thread(
            lambda: [
                encode_png(image, spec.parameters(seed, generated.model_version))
                for image, seed in zip(generated.images, generated.seeds, strict=True)
            ]
        )
        verdicts = await self.gate.check(pngs, spec.prompt, timeout)
        images, blocked = [], []
        for png, image, seed, verdict in zip(pngs, generated.images, generated.seeds, verdicts, strict=True):
            if verdict.allowed:
                images.append(
                    OutputImage(
                        png=png,
                        seed=seed,
                        image_id=hashlib.sha256(png).hexdigest(),
                        width=int(image.shape[1]),
                        height=int(image.shape[0]),
                        rating=verdict.rating,
                    )
                )
            else:
                ITEM_FAILURES.labels("sampler", "blocked").inc()
                blocked.append(BlockedOutput(seed=seed, reasons=verdict.reasons))
                log.info("image blocked", extra={"seed": seed, "reasons": [r[0] for r in verdict.reasons]})
        return GenerationResult(
            spec=spec,
            images=images,
            blocked=blocked,
            model_version=generated.model_version,
            batch_size=generated.batch_size,
            safety_checked=self.gate.enabled,
            safety_note=self.gate.note,
        )

    # --- jobs ---

    @property
    def jobs(self) -> JobStore:
        if self._jobs is None:
            self._jobs = JobStore(catalog_for(self.settings.database_url))
        return self._jobs

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = BlobStore(self.settings.blob_url)
        return self._blobs

    async def submit_job(self, request: dict[str, Any], priority: int | None = None) -> Job:
        """Writes the job (`request`: the validated request as the task will send it, its seed fixed) and queues
        it on the `generate` queue; a broker that is down fails the job (UNAVAILABLE)."""
        from services.sampler.tasks import enqueue

        record = await asyncio.to_thread(self.jobs.create, request, priority)
        await asyncio.to_thread(enqueue, self.settings, self.jobs, record)
        return Job(record)

    def _job(self, record: JobRecord, with_images: bool) -> Job:
        """The job with its PNGs read back from the blob store once it has a result (and they are wanted)."""
        if not with_images or not record.result.get("response"):
            return Job(record)
        return Job(record, [self.blobs.get(key) for key in record.result.get("blob_keys", [])])

    async def get_job(self, job_id: str, *, with_images: bool = True) -> Job:
        record = await asyncio.to_thread(self.jobs.get, job_id)
        return await asyncio.to_thread(self._job, record, with_images)

    async def watch_job(
        self, job_id: str, *, after_event_id: int = 0, with_images: bool = True
    ) -> AsyncIterator[tuple[Job, JobEvent]]:
        """(the job as of the event, the event) for every event of the job after `after_event_id`, then for each
        new one as it is written, until the job's final event. A cursor at or past the final event yields nothing.
        Events are read from the job's log, so a change between two polls is never missed."""
        if after_event_id < 0:
            raise InvalidArgument("after_event_id", f"must be 0 or an event_id WatchJob sent, got {after_event_id}")
        after = after_event_id
        while True:
            # The job first: a job that is done already has its final event committed, so the read below sees it.
            record = await asyncio.to_thread(self.jobs.get, job_id)
            events = await asyncio.to_thread(self.jobs.events, record.id, after)
            for event in events:
                after = event.id
                if event.terminal and not record.done:  # it ended after the job was read: read its result
                    record = await asyncio.to_thread(self.jobs.get, job_id)
                yield await asyncio.to_thread(self._job, record.as_of(event), with_images), event
                if event.terminal:
                    return
            if record.done and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_S)

    async def cancel_job(self, job_id: str) -> Job:
        """queued/running -> cancelled (a running job's task cancels its stream); a finished job stays as it is."""
        record = await asyncio.to_thread(self.jobs.cancel, job_id)
        log.info("job cancel", extra={"job_id": record.id, "state": record.state})
        return Job(record)

    # --- versions ---

    async def load_version(self, uri: str, source_run_id: str = "") -> VersionInfo:
        """Triton loads the next version; the catalog records it as the active one. Only a pipeline under the model
        roots (models_dir, the trainer's runs folder, PONY_SAMPLER_MODEL_ROOTS) is loaded; anything else is
        InvalidArgument("uri") that does not say whether it exists."""
        self.model.require_ready()
        uri = confine_model_uri(self.settings, uri)
        return await asyncio.to_thread(self._load_version, uri, source_run_id)

    def _load_version(self, uri: str, source_run_id: str) -> VersionInfo:
        info = self.model.load_version(uri)
        if self.versions is not None:
            source = next((v.source for v in self.model.repository.versions() if v.version == info.version), uri)
            try:
                self.versions.record(info.version, source, source_run_id, active=True)
            except Exception:
                log.exception("version %s is served but could not be recorded in model_versions", info.version)
        return info

    async def list_versions(self) -> list[VersionInfo]:
        return await asyncio.to_thread(self.model.list_versions)
