"""Generating the grid through the sampler: one low-priority job per cell (SubmitJob priority 0, then WatchJob),
or blocking Generate calls (`direct`, when no `generate` worker runs), against a named model family, version and
adapters."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from pony.v1 import sampler_pb2
from pony_common.blobs import BlobStore
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable, FailedPrecondition, InvalidArgument
from services.sampler.client import SamplerClient, build_request
from services.trainer.evaluation.grid import SCORE_TAG_LEVEL
from services.trainer.evaluation.results import Adapter, GridCell

log = logging.getLogger(__name__)

EVAL_PRIORITY = 0  # the lowest: app traffic goes first
FINAL = {
    sampler_pb2.JOB_STATE_SUCCEEDED,
    sampler_pb2.JOB_STATE_FAILED,
    sampler_pb2.JOB_STATE_CANCELLED,
    sampler_pb2.JOB_STATE_BLOCKED,
}


@dataclass(frozen=True)
class Generated:
    """One cell's image (png empty when the safety check blocked it or the job failed: `error` says why)."""

    cell_id: str
    png: bytes = b""
    uri: str = ""
    image_id: str = ""
    seconds: float = 0.0
    model_version: int | None = None
    prompt: str = ""  # as the model saw it
    error: str = ""


def cell_request(
    cell: GridCell, model: str, version: int, adapters: Sequence[Adapter], steps: int = 0, size: int = 0
) -> sampler_pb2.GenerateRequest:
    """The GenerateRequest of one cell: the special tags (score, style cluster, source, rating) in PromptTags, the
    content and any style words in the prompt."""
    options: dict = {
        "seed": cell.seed,
        "num_images": 1,
        "rating": "safe",
        "score": SCORE_TAG_LEVEL if cell.score_tags else None,
        "negative_prompt": cell.negative_prompt or None,
        "model": model or None,
        "model_version": version or None,
        "steps": steps or None,
        "width": size or None,
        "height": size or None,
    }
    if cell.style.kind == "cluster" and cell.style.cluster is not None:
        options["style_clusters"] = [cell.style.cluster]
        options["style_family"] = cell.style.family or None
    elif cell.style.kind == "source":
        options["source"] = cell.style.value
    request = build_request(cell.prompt, **options)
    for adapter in adapters:
        request.adapters.append(
            sampler_pb2.AdapterRef(name=adapter.name, version=adapter.version, weight=adapter.weight)
        )
    return request


def _failed(exc: grpc.RpcError, what: str) -> Exception:
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(what, f"the sampler refused it: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"sampler: {details}")
    return DependencyUnavailable(f"sampler {code.name}: {details}")


class SamplerGenerator:
    """Generates cells on the sampler at `settings.sampler_addr`. Generate answers carry the PNG; they are stored
    in the blob store under `prefix` (job results are stored by the sampler's worker already)."""

    def __init__(
        self,
        settings: Settings,
        model: str,
        version: int = 0,
        adapters: Sequence[Adapter] = (),
        *,
        steps: int = 0,
        size: int = 0,
        direct: bool = False,
        client: SamplerClient | None = None,
        blobs: BlobStore | None = None,
        prefix: str = "evaluations/images",
    ) -> None:
        self.settings = settings
        self.model = model
        self.version = version
        self.adapters = tuple(adapters)
        self.steps = steps
        self.size = size
        self.direct = direct
        self.client = client or SamplerClient(settings, timeout=max(settings.rpc_timeout_s, 600.0))
        self.blobs = blobs or BlobStore(settings.blob_url)
        self.prefix = prefix

    def request(self, cell: GridCell) -> sampler_pb2.GenerateRequest:
        return cell_request(cell, self.model, self.version, self.adapters, self.steps, self.size)

    def serving_version(self) -> int | None:
        """The version of `model` the sampler serves now (None when it lists none)."""
        try:
            versions = self.client.list_versions()
        except grpc.RpcError as exc:
            raise _failed(exc, "model") from None
        active = [v.version for v in versions if v.active and (not v.model or v.model == self.model)]
        return max(active) if active else None

    def generate(
        self, cells: Sequence[GridCell], on_image: Callable[[Generated], None] | None = None
    ) -> list[Generated]:
        """One Generated per cell, in the cells' order."""
        return self._direct(cells, on_image) if self.direct else self._jobs(cells, on_image)

    def _store(self, cell: GridCell, png: bytes, image_id: str) -> str:
        key = self.blobs.put(f"{self.prefix}/{image_id[:2]}/{image_id}.png", png)
        return self.blobs.uri(key)

    def _result(self, cell: GridCell, result: sampler_pb2.GenerateResponse, seconds: float) -> Generated:
        version = int(result.provenance.model_version) if result.provenance.model_version.isdigit() else None
        if not result.images:
            reasons = "; ".join(r.message for b in result.blocked for r in b.reasons) or "no image"
            return Generated(cell.cell_id, seconds=seconds, model_version=version, error=f"blocked: {reasons}")
        image = result.images[0]
        uri = image.uri or self._store(cell, image.png, image.image_id)
        return Generated(cell.cell_id, image.png, uri, image.image_id, seconds, version, result.prompt)

    def _direct(self, cells: Sequence[GridCell], on_image: Callable[[Generated], None] | None) -> list[Generated]:
        out = []
        for cell in cells:
            start = time.monotonic()
            try:
                result = self.client.stub.Generate(self.request(cell), timeout=self.client.timeout)
            except grpc.RpcError as exc:
                raise _failed(exc, f"cells[{cell.cell_id}]") from None
            item = self._result(cell, result, time.monotonic() - start)
            out.append(item)
            if on_image:
                on_image(item)
        return out

    def _jobs(self, cells: Sequence[GridCell], on_image: Callable[[Generated], None] | None) -> list[Generated]:
        job_ids: list[str] = []
        try:
            for cell in cells:
                req = sampler_pb2.SubmitJobRequest(request=self.request(cell), priority=EVAL_PRIORITY)
                job_ids.append(self.client.stub.SubmitJob(req, timeout=self.client.timeout).job.job_id)
        except grpc.RpcError as exc:
            self._cancel(job_ids)
            raise _failed(exc, "cells") from None
        out = []
        try:
            for cell, job_id in zip(cells, job_ids, strict=True):
                job = None
                for event in self.client.watch_job(job_id):
                    job = event.job
                    if job.state in FINAL:
                        break
                if job is None or job.state not in FINAL:
                    raise DependencyUnavailable(f"sampler job {job_id} ({cell.cell_id}) did not finish")
                seconds = max(job.updated_at.ToDatetime().timestamp() - job.created_at.ToDatetime().timestamp(), 0.0)
                if job.state in (sampler_pb2.JOB_STATE_SUCCEEDED, sampler_pb2.JOB_STATE_BLOCKED):
                    item = self._result(cell, job.result, seconds)
                else:
                    state = sampler_pb2.JobState.Name(job.state)
                    item = Generated(cell.cell_id, seconds=seconds, error=f"job {job_id} {state}: {job.error}")
                out.append(item)
                if on_image:
                    on_image(item)
        except BaseException:
            self._cancel(job_ids[len(out) :])
            raise
        return out

    def _cancel(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            try:
                self.client.cancel_job(job_id)
            except grpc.RpcError:
                log.warning("could not cancel evaluation job", extra={"job_id": job_id})
