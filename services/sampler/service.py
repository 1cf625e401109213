"""The sampler's logic, transport-free: one generation end to end (validate, stream from Triton, encode PNGs with
their parameters, check them for safety, keep only what may be returned), asynchronous jobs and model versions."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pony_common.access import confine_model_uri
from pony_common.blobs import BlobStore
from pony_common.catalog import catalog_for
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, InvalidArgument
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES, SAMPLER_COMPUTE, SAMPLER_QUEUE_WAIT
from services.sampler.adapters import Adapter, AdapterRegistry
from services.sampler.encoding import ImageEncoder
from services.sampler.families import Family, resolve
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
from services.sampler.pnginfo import ModelHashes
from services.sampler.safety_gate import SafetyGate
from services.sampler.store import MAX_PRIORITY, JobEvent, JobRecord, JobStore, VersionCatalog
from services.sampler.validation import RequestValidator

log = logging.getLogger(__name__)

WATCH_POLL_S = 0.2  # how often a watch looks for new events once it has replayed the log (it misses none)


@dataclass(frozen=True)
class FamilyInfo:
    """A served family as ListModels shows it: what it is, its defaults and limits, its versions."""

    family: Family
    versions: list[VersionInfo]
    adapters: list[Any] = field(default_factory=list)


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
        self.catalogs: dict[str, VersionCatalog] = {}  # family -> its model_versions rows
        self._validator: RequestValidator | None = None
        self._jobs: JobStore | None = None
        self._blobs: BlobStore | None = None
        self.encoder = ImageEncoder(settings.sampler.encode_workers)  # PNG encoding off the event loop
        self._adapters: AdapterRegistry | None = None
        # A1111 `Model hash` per version's weights, computed once (services/sampler/pnginfo.py ModelHashes).
        self.model_hashes = ModelHashes(Path(settings.state_dir) / "model_hashes.json")

    # --- lifecycle ---

    def load(self) -> None:
        """Catalog versions -> repository, the model (tokenizers, Triton), repository -> catalog, for every served
        family; blocking."""
        catalog = catalog_for(self.settings.database_url)
        self.catalogs = {name: VersionCatalog(catalog, name) for name in self.model.families}
        self._adapters = AdapterRegistry(self.settings, catalog, lambda: tuple(self.model.families))
        for name, versions in self.catalogs.items():
            versions.import_published(self.model.repositories[name], self.model.candidates[name])
        self.model.load()
        for name, versions in self.catalogs.items():
            versions.record_repository(self.model.repositories[name])
        self._validator = RequestValidator(self.settings, self.model.tokenizers)
        self.gate.announce()
        self._hash_in_background([(name, r.latest()) for name, r in self.model.repositories.items()])

    def _hash_in_background(self, versions: list[tuple[str, int]]) -> None:
        """Computes the PNGs' `Model hash` of these (family, version)s now, so the first image does not wait on it."""

        def work() -> None:
            for family, version in versions:
                try:
                    self.model_hash(family, str(version))
                except Exception:
                    log.exception("model hash of %s version %s", family, version)

        threading.Thread(target=work, name="model-hash", daemon=True).start()

    def close(self) -> None:
        self.model.teardown()
        self.encoder.close()

    # --- generation ---

    def spec(self, given: GenerationInput) -> GenerationSpec:
        """The validated generation (defaults filled, seed drawn when not given), or InvalidArgument(field).
        Blocking CPU work (tokenizing): async callers run it in a worker thread."""
        self.model.require_ready()
        if self._validator is None:
            raise DependencyUnavailable("the sampler is still loading its model")
        spec = self._validator.spec(given)
        if given.adapters:  # LoRAs: resolved in the registry (versions, files, weights) or InvalidArgument
            spec = replace(spec, adapters=self.adapters.resolve(given.adapters, spec.model))
        return spec

    async def run(
        self, spec: GenerationSpec, timeout: float | None = None, priority: int | None = None
    ) -> AsyncIterator[Progress | GenerationResult]:
        """Progress events, then the GenerationResult (after the safety check). A prompt the safety rules block on
        its text alone is refused before any GPU work: a result with no images, every seed blocked with the rules'
        reasons, as a blocked image is (so callers, jobs (state `blocked`) and the CLI read one shape). `priority`
        0..9 orders Triton's queue (None: the direct-call default); a full queue is Overloaded (RESOURCE_EXHAUSTED)."""
        if priority is not None and not 0 <= priority <= MAX_PRIORITY:
            raise InvalidArgument("priority", f"must be in 0..{MAX_PRIORITY}, got {priority}")
        refusal = await self.gate.check_prompt(spec.prompt, timeout)
        if not refusal.allowed:
            yield self.refused(spec, refusal.reasons)
            return
        generated: Generated | None = None
        async for event in self.model.stream(spec, timeout, priority):
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
        SAMPLER_COMPUTE.labels(spec.model).observe(generated.compute_s)
        # Queue wait as the sampler can see it: the request's time in Triton less the model's compute.
        SAMPLER_QUEUE_WAIT.labels(spec.model).observe(max(0.0, generated.elapsed_s - generated.compute_s))
        # PNGs encoded in the encoder's worker pool while the safety service checks the raw pixels (no decode).
        model_hash = await asyncio.to_thread(self.model_hash, spec.model, generated.model_version)
        params = [spec.parameters(seed, generated.model_version, model_hash) for seed in generated.seeds]
        pngs, verdicts = await asyncio.gather(
            self.encoder.encode(generated.images, params), self.gate.check(generated.images, spec.prompt, timeout)
        )
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
            model_hash=model_hash,
        )

    def model_hash(self, family: str, version: str) -> str:
        """A1111's short hash of the weights that served (`family`, `version`); "" when unknown. Blocking (the
        first call per version hashes the weights)."""
        repository = self.model.repositories.get(family)
        if repository is None:
            return ""
        held = [*repository.versions(), *self.model.candidates[family].versions()]
        found = next((v for v in held if str(v.version) == str(version)), None)
        return self.model_hashes.get(found.uri) if found is not None else ""

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

    def family(self, name: str) -> Family:
        """A served family by name (empty = the default), or InvalidArgument("model")."""
        return resolve(self.model.families, name)

    async def load_version(
        self, uri: str, source_run_id: str = "", family: str = "", *, candidate: bool = False
    ) -> VersionInfo:
        """Triton loads the next version of `family` (empty = the default); the catalog records it as the active
        one. `candidate`: loaded beside the serving version instead (only requests pinning it reach it; its row is
        not active) until `promote_version` or `discard_version`. Only a pipeline under the model roots
        (models_dir, the trainer's runs folder, PONY_SAMPLER_MODEL_ROOTS) is loaded; anything else is
        InvalidArgument("uri") that does not say whether it exists."""
        name = self.family(family).name
        self.model.require_ready()
        uri = confine_model_uri(self.settings, uri)
        return await asyncio.to_thread(self._load_version, uri, source_run_id, name, candidate)

    def _catalog_highest(self, family: str) -> int:
        versions = self.catalogs.get(family)
        if versions is None:
            return 0
        try:
            return max(versions.rows(), default=0)
        except Exception:
            log.exception("model_versions of %s could not be read", family)
            return 0

    def _load_version(self, uri: str, source_run_id: str, family: str, candidate: bool = False) -> VersionInfo:
        after = self._catalog_highest(family)  # a number the trainer wrote while no sampler ran is never reused
        if candidate:
            info = self.model.load_candidate(uri, family, after)
            repository = self.model.candidates[family]
        else:
            info = self.model.load_version(uri, family, after)
            repository = self.model.repositories[family]
        self._hash_in_background([(family, info.version)])
        versions = self.catalogs.get(family)
        if versions is not None:
            source = next((v.source for v in repository.versions() if v.version == info.version), uri)
            try:
                versions.record(info.version, source, source_run_id, active=not candidate)
            except Exception:
                log.exception("%s version %s is served but could not be recorded", family, info.version)
        return info

    async def promote_version(self, family: str, version: int) -> VersionInfo:
        """The candidate `version` of `family` becomes its serving version (the catalog row turns active)."""
        name = self.family(family).name
        self.model.require_ready()
        if version <= 0:
            raise InvalidArgument("version", "must be the candidate's version number")
        info = await asyncio.to_thread(self.model.promote_version, name, version)
        versions = self.catalogs.get(name)
        if versions is not None:
            try:
                await asyncio.to_thread(versions.activate, version)
            except Exception:
                log.exception("%s version %s serves but could not be recorded active", name, version)
        return info

    async def discard_version(self, family: str, version: int, reason: str = "") -> VersionInfo:
        """The candidate `version` of `family` is unloaded and removed; its row stays inactive, its number is kept
        as discarded (the repository's ledger) so it is never served or reused."""
        name = self.family(family).name
        self.model.require_ready()
        if version <= 0:
            raise InvalidArgument("version", "must be the candidate's version number")
        return await asyncio.to_thread(self.model.discard_version, name, version, reason.strip())

    async def list_versions(self, family: str = "") -> list[VersionInfo]:
        """One family's versions (empty: every served family's)."""
        name = self.family(family).name if family else ""
        return await asyncio.to_thread(self.model.list_versions, name)

    async def list_models(self) -> list[FamilyInfo]:
        """Every served family (the default marked) with its defaults, limits and versions."""
        versions = await asyncio.to_thread(self.model.list_versions)
        adapters = await asyncio.to_thread(self.adapters.list)
        return [
            FamilyInfo(family, [v for v in versions if v.model == name], [a for a in adapters if a.family == name])
            for name, family in self.model.families.items()
        ]

    # --- adapters ---

    @property
    def adapters(self) -> AdapterRegistry:
        if self._adapters is None:
            catalog = catalog_for(self.settings.database_url)
            self._adapters = AdapterRegistry(self.settings, catalog, lambda: tuple(self.model.families))
        return self._adapters

    async def register_adapter(self, name: str, uri: str, family: str = "") -> Adapter:
        """The next version of LoRA `name` for `family` (empty: the default) from `uri` (under the model roots)."""
        return await asyncio.to_thread(self.adapters.register, name, uri, family)

    async def remove_adapter(self, name: str, version: int = 0) -> list[Adapter]:
        """Removes one version (0: all) of `name`; requests naming it are then InvalidArgument. Triton drops the
        loaded copies as its LRU cache turns over (a removed adapter is never activated again)."""
        return await asyncio.to_thread(self.adapters.remove, name, version)
