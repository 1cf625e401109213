"""The typed, blocking client of `pony.v1.Sampler` for app backends (and the trainer, the CLI): generate, stream,
asynchronous jobs and model versions.

client = SamplerClient(settings)                  # settings.sampler_addr, bearer token, TLS, retries
resp = client.generate("a pony in a meadow", seed=1, width=1024, height=1024, score=9, source="pony")
resp = client.generate("a pony", model="pony_v6", score=7)  # another family (client.list_models() lists them)
resp = client.generate("a pony", adapters=["style-a=0.8", ("style-b", 2, 1.0)])  # LoRAs: name[:version][=weight]
open("out.png", "wb").write(resp.images[0].png)
for event in client.stream("a pony", seed=1):     # Progress events, then the result
    ...
job = client.submit_job("a pony", priority=7); client.cancel_job(job.job_id)
for event in client.watch_job(job.job_id):         # the job as of each event, and its event_id (the cursor)
    ...                                            # resume: client.watch_job(job.job_id, after_event_id=event.event_id)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from pony.v1 import sampler_pb2, sampler_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.client import ServiceClient

RATINGS = {"safe": 1, "questionable": 2, "explicit": 3}


def build_request(prompt: str = "", **options: Any) -> Any:
    """A GenerateRequest from keyword options: model (the family, e.g. "pony_v6"), model_version, negative_prompt,
    width, height, steps, guidance, seed, num_images, raw_prompt, preview, and the tags score, style_clusters,
    source, rating ("safe" | "questionable" | "explicit"), palette (colour names) and style_family."""
    tags = sampler_pb2.PromptTags()
    if options.get("score") is not None:
        tags.score = int(options.pop("score"))
    options.pop("score", None)
    tags.style_clusters.extend(int(c) for c in options.pop("style_clusters", None) or ())
    tags.source = options.pop("source", None) or ""
    tags.palette.extend(options.pop("palette", None) or ())
    tags.style_family = options.pop("style_family", None) or ""
    adapters = [lora_ref(a) for a in options.pop("adapters", None) or ()]
    rating = options.pop("rating", None)
    if rating:
        if rating not in RATINGS:
            raise ValueError(f"rating must be one of {', '.join(RATINGS)}, got {rating!r}")
        tags.rating = RATINGS[rating]
    request = sampler_pb2.GenerateRequest(prompt=prompt, tags=tags, adapters=adapters)
    for key, value in options.items():
        if value is None:
            continue
        if not hasattr(request, key):
            raise TypeError(f"unknown option {key!r}")
        setattr(request, key, value)
    return request


def lora_ref(value: Any) -> Any:
    """An AdapterRef from `"name[:version][=weight]"`, a (name, version[, weight]) tuple or an AdapterRef
    (version 0 = the newest; no weight = 1.0). ValueError on a malformed one."""
    if isinstance(value, sampler_pb2.AdapterRef):
        return value
    if isinstance(value, tuple | list):
        name, version, *rest = value
        ref = sampler_pb2.AdapterRef(name=str(name), version=int(version or 0))
        if rest and rest[0] is not None:
            ref.weight = float(rest[0])
        return ref
    text = str(value).strip()
    head, has_weight, weight = text.partition("=")
    name, _, version = head.partition(":")
    try:
        ref = sampler_pb2.AdapterRef(name=name.strip(), version=int(version) if version.strip() else 0)
        if has_weight:
            ref.weight = float(weight)
    except ValueError:
        raise ValueError(f"a LoRA is name[:version][=weight], e.g. style-a:2=0.8; got {text!r}") from None
    if not ref.name or ref.version < 0:
        raise ValueError(f"a LoRA is name[:version][=weight], e.g. style-a:2=0.8; got {text!r}")
    return ref


class SamplerClient(ServiceClient):
    """The sampler at `target` (default `settings.sampler_addr`) on the process's shared channel. Methods return
    the `pony.v1` response messages; errors are grpc.RpcError (INVALID_ARGUMENT names the field, UNAVAILABLE means
    retry later). `timeout` is the default deadline of a call (default `rpc_timeout_s`)."""

    SERVICE = "sampler"
    STUB = sampler_pb2_grpc.SamplerStub

    def __init__(self, settings: Settings, target: str | None = None, timeout: float | None = None) -> None:
        super().__init__(settings, target or None)
        self._timeout = timeout or settings.rpc_timeout_s

    @property
    def timeout(self) -> float:
        return self._timeout

    def close(self) -> None:
        """Ends a `with` block. The channel is the process's, shared with other clients of the same address, so
        it stays open (`reset()` drops it)."""

    def __enter__(self) -> SamplerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str = "", *, timeout: float | None = None, **options: Any) -> Any:
        """GenerateResponse: images (PNG bytes with parameters), blocked images' reasons, provenance."""
        return self.stub.Generate(build_request(prompt, **options), timeout=timeout or self.timeout)

    def stream(self, prompt: str = "", *, timeout: float | None = None, **options: Any) -> Iterator[Any]:
        """GenerateStreamResponse events: `progress` (step, total, preview_png) then one `result`.
        Stopping the iteration early (break, close) cancels the generation in Triton."""
        call = self.stub.GenerateStream(
            sampler_pb2.GenerateStreamRequest(request=build_request(prompt, **options)),
            timeout=timeout or self.timeout,
        )
        try:
            yield from call
        finally:
            call.cancel()

    def submit_job(self, prompt: str = "", *, priority: int | None = None, **options: Any) -> Any:
        """The queued Job (its job_id); priority 0 (lowest) .. 9 (highest)."""
        req = sampler_pb2.SubmitJobRequest(request=build_request(prompt, **options))
        if priority is not None:
            req.priority = priority
        return self.stub.SubmitJob(req, timeout=self.timeout).job

    def get_job(self, job_id: str, *, omit_images: bool = False) -> Any:
        return self.stub.GetJob(
            sampler_pb2.GetJobRequest(job_id=job_id, omit_images=omit_images), timeout=self.timeout
        ).job

    def watch_job(
        self, job_id: str, *, after_event_id: int = 0, timeout: float | None = None, omit_images: bool = False
    ) -> Iterator[Any]:
        """WatchJobResponse for every event of the job after `after_event_id` (0: its whole history: queued,
        running, each progress step, ...), then each new one, until the job's final event. `.job` is the job as of
        that event, `.event_id` the cursor to resume from. Stopping the iteration early cancels the stream."""
        call = self.stub.WatchJob(
            sampler_pb2.WatchJobRequest(job_id=job_id, omit_images=omit_images, after_event_id=after_event_id),
            timeout=timeout or self.settings.sampler.job_timeout_s,
        )
        try:
            yield from call
        finally:
            call.cancel()

    def cancel_job(self, job_id: str) -> Any:
        return self.stub.CancelJob(sampler_pb2.CancelJobRequest(job_id=job_id), timeout=self.timeout).job

    def load_version(
        self,
        uri: str,
        source_run_id: str = "",
        *,
        model: str = "",
        candidate: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The ModelVersion `uri` became: the next version of `model` (the family; empty = the default).
        `candidate`: loaded beside the serving version, reached only by requests pinning `model_version` to it,
        until `promote_version` or `discard_version` (admin)."""
        req = sampler_pb2.LoadVersionRequest(uri=uri, source_run_id=source_run_id, model=model, candidate=candidate)
        return self.stub.LoadVersion(req, timeout=timeout or self.settings.sampler.triton_start_timeout_s).version

    def promote_version(self, version: int, *, model: str = "", timeout: float | None = None) -> Any:
        """The ModelVersion: candidate `version` of `model` now serving (admin)."""
        req = sampler_pb2.PromoteVersionRequest(model=model, version=version)
        return self.stub.PromoteVersion(req, timeout=timeout or self.settings.sampler.triton_start_timeout_s).version

    def discard_version(self, version: int, *, model: str = "", reason: str = "", timeout: float | None = None) -> Any:
        """The ModelVersion: candidate `version` of `model` unloaded and removed, never served (admin)."""
        req = sampler_pb2.DiscardVersionRequest(model=model, version=version, reason=reason)
        return self.stub.DiscardVersion(req, timeout=timeout or self.settings.sampler.triton_start_timeout_s).version

    def list_versions(self, model: str = "") -> list[Any]:
        """ModelVersion rows of `model` (empty: of every served family)."""
        req = sampler_pb2.ListVersionsRequest(model=model)
        return list(self.stub.ListVersions(req, timeout=self.timeout).versions)

    def list_models(self) -> list[Any]:
        """ModelFamily messages: every served family with its defaults, limits, versions, adapters, is_default."""
        return list(self.stub.ListModels(sampler_pb2.ListModelsRequest(), timeout=self.timeout).models)

    def register_adapter(self, name: str, uri: str, *, family: str = "", timeout: float | None = None) -> Any:
        """The Adapter registered (admin): the next version of `name`, the LoRA file or folder at `uri`."""
        req = sampler_pb2.RegisterAdapterRequest(name=name, family=family, uri=uri)
        return self.stub.RegisterAdapter(req, timeout=timeout or self.timeout).adapter

    def remove_adapter(self, name: str, version: int = 0) -> list[Any]:
        """The Adapter versions removed (admin); version 0 = every version of `name`."""
        req = sampler_pb2.RemoveAdapterRequest(name=name, version=version)
        return list(self.stub.RemoveAdapter(req, timeout=self.timeout).removed)


def is_invalid_argument(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
