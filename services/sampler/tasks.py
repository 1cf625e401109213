"""Celery `generate` queue: a job is a thin GenerateStream call to the sampler plus catalog and blob writes."""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc
from google.protobuf import json_format

from pony_common.blobs import BlobStore
from pony_common.catalog import catalog_for
from pony_common.celery_app import is_retryable, pony_task
from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable
from services.sampler.store import BLOCKED, CANCELLED, FAILED, SUCCEEDED, JobRecord, JobStore

log = logging.getLogger(__name__)

TASK_NAME = "pony.sampler.generate"
CANCEL_POLL_S = 0.5


def broker_priority(settings: Settings, priority: int) -> int:
    """Our 0 (lowest) .. 9 (highest) in the broker's terms: RabbitMQ ranks 9 first, Redis ranks 0 first."""
    return 9 - priority if settings.broker_url.startswith(("redis://", "rediss://")) else priority


def enqueue(settings: Settings, store: JobStore, record: JobRecord) -> None:
    """Sends the job to the `generate` queue (task id = job id). A broker that is down fails the job."""
    from pony_common.celery_app import app, configure_app

    if app.conf.get("pony_settings") != settings:
        configure_app(settings)
    try:
        generate.apply_async(args=[record.id], task_id=record.id, priority=broker_priority(settings, record.priority))
    except Exception as exc:
        store.claim(record.id)
        store.finish(record.id, FAILED, error=f"could not queue the job: {exc}")
        raise DependencyUnavailable(f"the job queue is unavailable: {exc}") from None


def _watch_cancel(store: JobStore, job_id: str, call: Any, stop: threading.Event) -> None:
    """Cancels the gRPC stream (and so the Triton request) when the job is cancelled in the catalog."""
    while not stop.wait(CANCEL_POLL_S):
        try:
            if store.get(job_id).state == CANCELLED:
                call.cancel()
                return
        except Exception as exc:
            log.warning("job cancel watch: %s", exc)


def run_job(settings: Settings, store: JobStore, blobs: BlobStore, job_id: str) -> str:
    """Runs one claimed job to a final state; returns it. Raises on errors worth a retry."""
    from pony.v1 import sampler_pb2, sampler_pb2_grpc
    from pony_common.grpc.client import channel

    job = store.get(job_id)
    request = json_format.ParseDict(job.request, sampler_pb2.GenerateRequest(), ignore_unknown_fields=True)
    result: Any = None
    stop = threading.Event()
    with channel(settings, "sampler") as ch:
        call = sampler_pb2_grpc.SamplerStub(ch).GenerateStream(
            sampler_pb2.GenerateStreamRequest(request=request, priority=job.priority),  # Triton serves 9 first
            timeout=settings.sampler.job_timeout_s,
            metadata=[("x-request-id", f"job-{job_id}")],  # names the job in the sampler's and Triton's logs
        )
        watcher = threading.Thread(target=_watch_cancel, args=(store, job_id, call, stop), daemon=True)
        watcher.start()
        try:
            for event in call:
                if event.HasField("progress"):
                    store.progress(job_id, event.progress.step, event.progress.total)
                else:
                    result = event.result
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and store.get(job_id).state == CANCELLED:  # type: ignore[attr-defined]
                return CANCELLED
            if is_retryable(exc):
                store.requeue(job_id, f"retrying: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
                raise
            store.finish(job_id, FAILED, error=f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
            return FAILED
        finally:
            stop.set()
            watcher.join(2)
    if result is None:
        store.finish(job_id, FAILED, error="the sampler closed the stream without a result")
        return FAILED
    keys = []
    for i, image in enumerate(result.images):
        key = blobs.put(f"generated/{job_id}/{i}.png", image.png)
        keys.append(key)
        image.uri = blobs.uri(key)
        image.png = b""
    state = BLOCKED if result.blocked and not result.images else SUCCEEDED
    payload = {"response": json_format.MessageToDict(result, preserving_proto_field_name=True), "blob_keys": keys}
    if not store.finish(job_id, state, payload):
        return store.get(job_id).state  # cancelled while the images were being stored
    return state


@pony_task(TASK_NAME, queue="generate")
def generate(self: Any, job_id: str) -> dict[str, Any]:
    """Claims the job (a cancelled or finished job is left alone), streams it, records the outcome."""
    from pony_common.celery_app import current_settings

    settings = current_settings()
    store = JobStore(catalog_for(settings.database_url))
    if not store.claim(job_id):
        return {"job_id": job_id, "state": store.get(job_id).state, "ran": False}
    state = run_job(settings, store, BlobStore(settings.blob_url), job_id)
    log.info("generation job done", extra={"job_id": job_id, "state": state})
    return {"job_id": job_id, "state": state, "ran": True}
