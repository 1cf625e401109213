"""One generation end to end, transport-free: validate, stream from Triton, encode PNGs with their parameters,
check them for safety, and keep only what may be returned."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator

from pony_common.catalog import catalog_for
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from pony_common.metrics import BATCH_SIZE, ITEM_FAILURES, SAMPLER_COMPUTE, SAMPLER_QUEUE_WAIT
from services.sampler.backend import TritonSampler, VersionInfo
from services.sampler.generation import (
    MODEL_NAME,
    BlockedOutput,
    Generated,
    GenerationInput,
    GenerationResult,
    GenerationSpec,
    OutputImage,
    Progress,
)
from services.sampler.pnginfo import encode_png
from services.sampler.safety_gate import SafetyGate
from services.sampler.validation import RequestValidator
from services.sampler.versions import VersionCatalog

log = logging.getLogger(__name__)


class Sampler:
    """The sampler's domain logic over a TritonSampler backend and a SafetyGate."""

    def __init__(self, settings: Settings, backend: TritonSampler, gate: SafetyGate) -> None:
        self.settings = settings
        self.backend = backend
        self.gate = gate
        self.versions: VersionCatalog | None = None
        self._validator: RequestValidator | None = None

    @property
    def ready(self) -> bool:
        return self.backend.ready

    def load(self) -> None:
        """Tokenizer, catalog versions -> repository, Triton and the model; blocking (run in a thread)."""
        self.backend.prepare()
        self.versions = VersionCatalog(catalog_for(self.settings.database_url))
        self.versions.import_published(self.backend.repository)
        self.backend.start()
        self.versions.record_repository(self.backend.repository)
        self._validator = RequestValidator(self.settings, self.backend.tokenizer)
        self.gate.announce()

    def close(self) -> None:
        self.backend.close()

    def load_version(self, uri: str, source_run_id: str = "") -> VersionInfo:
        """Blocking: Triton loads the next version; the catalog records it as the active one."""
        info = self.backend.load_version(uri)
        if self.versions is not None:
            source = next((v.source for v in self.backend.repository.versions() if v.version == info.version), uri)
            try:
                self.versions.record(info.version, source, source_run_id, active=True)
            except Exception:
                log.exception("version %s is served but could not be recorded in model_versions", info.version)
        return info

    def spec(self, given: GenerationInput) -> GenerationSpec:
        if self._validator is None:
            raise DependencyUnavailable("the sampler is still loading its model")
        return self._validator.spec(given)

    async def run(
        self, spec: GenerationSpec, timeout: float | None = None
    ) -> AsyncIterator[Progress | GenerationResult]:
        """Progress events, then the GenerationResult (after the safety check)."""
        generated: Generated | None = None
        async for event in self.backend.stream(spec, timeout):
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
