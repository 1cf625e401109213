"""The model families as Triton serves them (one Triton model per family: `pony_v7`, `pony_v6`), on the shared
`Model` lifecycle: repository, the tritonserver process (single machine), model loading and versions per family,
and streaming generation over Triton's gRPC API to the family a spec names. Knows nothing of our gRPC servers or the
catalog."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from pony_common.config import Settings
from pony_common.errors import Cancelled, DependencyUnavailable, FailedPrecondition, InvalidArgument, Overloaded
from pony_common.logs import request_id_var
from pony_common.metrics import MODEL_INFO
from pony_common.models.lifecycle import Model
from pony_common.models.sources import require_model_source
from services.sampler.families import Family, default_family, served
from services.sampler.generation import Generated, GenerationSpec, Progress
from services.sampler.lora import dump_adapters
from services.sampler.repository import (
    MODEL_NAME,
    CandidateRepository,
    ModelRepository,
    RepoVersion,
    triton_priority,
)
from services.sampler.sync_sibling import sibling_name
from services.sampler.triton_server import TritonProcess

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
DRAIN_TIMEOUT_S = 5.0
_NOT_LOADED = ("unknown model", "is not found", "not ready", "no available version", "is not loaded")
# Triton 2.51 refuses a request past the model's `max_queue_size` with "[request id: x] Exceeds maximum queue size".
_QUEUE_FULL = "exceeds maximum queue size"
RETRY_AFTER_S = 2  # the retry hint of an overloaded model (RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class VersionInfo:
    """A version in the repository and its state in Triton (READY, LOADING, UNAVAILABLE, UNLOADED, ...)."""

    version: int
    uri: str
    state: str
    reason: str = ""
    active: bool = False
    model: str = MODEL_NAME  # the family
    candidate: bool = False  # loaded beside the serving version (`<family>_candidate`), reached only when pinned


def _error_from_triton(message: str, model: str = MODEL_NAME, version: int = 0) -> Exception:
    """A domain error for a per-request error message from Triton or from model.py (`version`: the one the request
    pinned, 0 = none)."""
    low = message.lower()
    if _QUEUE_FULL in low:
        return Overloaded(f"{model} is overloaded: its Triton queue is full; retry-after: {RETRY_AFTER_S}s")
    if low.startswith("invalid_argument:"):
        detail = message.split(":", 1)[1].strip()
        field, _, reason = detail.partition(":")
        return InvalidArgument(field.strip() or "request", reason.strip() or detail)
    if low.startswith("failed_precondition:"):  # the model cannot apply what was asked (a LoRA file that changed)
        return FailedPrecondition(message.split(":", 1)[1].strip())
    if "cancelled" in low:
        return Cancelled("generation cancelled")
    if any(marker in low for marker in _NOT_LOADED):
        if version:
            return FailedPrecondition(f"model_version: version {version} of {model} is not the one serving")
        return DependencyUnavailable(f"model {model} is not loaded in Triton")
    return RuntimeError(f"triton: {message}")


async def _drain(responses: Any, timeout: float = DRAIN_TIMEOUT_S) -> None:
    """Reads a finished stream to its end (Triton closes it once the request is complete and we half-closed)."""

    async def rest() -> None:
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(rest(), timeout)
    except (TimeoutError, grpc.aio.AioRpcError):
        responses.cancel()


def _from_rpc(exc: grpc.aio.AioRpcError) -> Exception:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return DependencyUnavailable("Triton is unavailable")
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Cancelled(f"generation stopped: {code.name.lower()}")
    return RuntimeError(f"triton rpc failed: {code.name}: {exc.details()}")


class SamplerModel(Model):
    """`load()` reads each served family's tokenizer, renders the repository, starts tritonserver when configured
    to, loads every family's Triton model and keeps them loaded (a watchdog restarts a dead server and reloads a
    missing model); `stream()` generates with the family the spec names; `teardown()` stops the watchdog and the
    tritonserver it started."""

    def __init__(self, settings: Settings, *, process: TritonProcess | None = None) -> None:
        super().__init__("sampler")
        self.settings = settings
        self.families: dict[str, Family] = served(settings)
        self.default = default_family(self.families).name
        self.repositories = {name: ModelRepository(settings.sampler.triton_repo, name) for name in self.families}
        # Each family's candidate model (a version loaded beside the serving one until promoted or discarded).
        self.candidates = {name: CandidateRepository(settings.sampler.triton_repo, name) for name in self.families}
        self.process = (
            process if process is not None else (TritonProcess(settings) if settings.sampler.triton_start else None)
        )
        self.url = self.process.grpc_url if self.process is not None else settings.sampler.triton_url
        self.tokenizers: dict[str, Any] = {}  # family -> the tokenizer of its prompt token budget
        self._control: Any = None
        self._triton_lock = threading.Lock()  # one Triton load_model at a time (start, watchdog, new versions)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._clients: dict[int, Any] = {}

    # --- lifecycle ---

    @property
    def model_id(self) -> str:
        return self.families[self.default].model_path

    @property
    def repository(self) -> ModelRepository:
        """The default family's repository."""
        return self.repositories[self.default]

    @property
    def tokenizer(self) -> Any:
        """The default family's tokenizer."""
        return self.tokenizers.get(self.default)

    def repository_of(self, family: str) -> ModelRepository:
        return self.repositories[family or self.default]

    def _load(self) -> None:
        """Each family's tokenizer (prompt token limits), then Triton. A load that fails stops what it started here
        (`teardown()` only tears down a model that finished loading)."""
        from transformers import AutoTokenizer

        for name, family in self.families.items():
            path = require_model_source(family.model_path, "sampler" if name == MODEL_NAME else "sampler_v6")
            self.tokenizers[name] = AutoTokenizer.from_pretrained(f"{path}/tokenizer")
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        """Renders the repository, starts tritonserver when configured to, loads each family's model, starts the
        watchdog."""
        for repository in [*self.repositories.values(), *self.candidates.values()]:
            repository.render(self.settings)
        if self.process is not None:
            self.process.start()
        self._wait_live(self.settings.sampler.triton_start_timeout_s)
        for name in self.families:
            if self._serving_latest(name):
                log.info("Triton already serves the latest version of %s", name)
                if not self._is_ready(sibling_name(name)):
                    with self._triton_lock:
                        self._load_sibling(name)
                self._publish_serving(name)
            else:
                self.load_model(name)
            if self.candidates[name].versions():  # a candidate left waiting for its promotion or discard
                try:
                    with self._triton_lock:
                        self.control.load_model(self.candidates[name].name)
                except Exception as exc:
                    log.warning("Triton could not load the candidate of %s: %s", name, exc)
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="triton-watchdog", daemon=True)
        self._watchdog.start()

    def _teardown(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(10)
            self._watchdog = None
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.process is not None:
            self.process.stop()

    @property
    def control(self) -> Any:
        """A blocking tritonclient for health, loading and the repository index."""
        if self._control is None:
            import tritonclient.grpc as tgrpc

            self._control = tgrpc.InferenceServerClient(self.url)
        return self._control

    def _wait_live(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._live():
                return
            if time.monotonic() > deadline:
                raise DependencyUnavailable(f"Triton at {self.url} is not live")
            time.sleep(0.5)

    def _live(self) -> bool:
        try:
            return bool(self.control.is_server_live(client_timeout=2))
        except Exception:
            return False

    def _is_ready(self, model: str) -> bool:
        try:
            return bool(self.control.is_model_ready(model, client_timeout=5))
        except Exception:
            return False

    def _serving_latest(self, family: str) -> bool:
        """True when Triton already has the family's newest version ready (another sampler loaded it)."""
        latest = self.repositories[family].latest()
        try:
            return latest > 0 and bool(self.control.is_model_ready(family, str(latest), client_timeout=5))
        except Exception:
            return False

    def load_model(self, family: str | None = None) -> None:
        """Explicit model control: (re)loads `family` (None: every served family); Triton serves the latest version
        folder."""
        from tritonclient.utils import InferenceServerException

        for name in [family] if family else list(self.families):
            with self._triton_lock:
                started = time.perf_counter()
                try:
                    self.control.load_model(name)
                except InferenceServerException as exc:
                    raise DependencyUnavailable(f"Triton could not load {name}: {exc.message()}") from None
                log.info("model loaded", extra={"model": name, "s": round(time.perf_counter() - started, 2)})
                self._load_sibling(name)
            self._publish_serving(name)

    def _load_sibling(self, family: str) -> None:
        """Loads `<family>_sync`, the non-decoupled forwarder plain KServe-v2 clients `infer` (no pipeline of its
        own); one that fails to load is logged, and the family serves on (the watchdog tries again)."""
        from tritonclient.utils import InferenceServerException

        try:
            self.control.load_model(sibling_name(family))
        except InferenceServerException as exc:
            log.warning("Triton could not load %s: %s", sibling_name(family), exc.message())

    def _publish_serving(self, family: str, version: RepoVersion | None = None) -> None:
        """The model-info metric names the default family's version that serves now (default: its latest)."""
        if family != self.default:
            return
        if version is None:
            versions = self.repositories[family].versions()
            if not versions:
                return
            version = versions[-1]
        info = {"model": family, "version": str(version.version), "uri": version.source or version.uri}
        MODEL_INFO.labels("sampler").info(info)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self._heal()
            except Exception as exc:
                log.warning("triton watchdog: %s", exc)

    def _heal(self) -> None:
        if self.process is not None and not self.process.running:
            log.warning("tritonserver is not running; restarting it")
            self._control = None
            self.process.start()
        if not self._live():
            return
        for name in self.families:
            if not self.control.is_model_ready(name, client_timeout=5):
                log.warning("model %s is not ready in Triton; loading it", name)
                self.load_model(name)
            elif not self._is_ready(sibling_name(name)):
                log.warning("model %s is not ready in Triton; loading it", sibling_name(name))
                with self._triton_lock:
                    self._load_sibling(name)

    # --- versions ---

    def next_version(self, family: str, after: int = 0) -> int:
        """The next version number of `family`: above its folders, its candidate's (loaded or discarded) and
        `after` (the catalog's highest)."""
        return max(self.repositories[family].latest(), self.candidates[family].highest(), after) + 1

    def candidate_version(self, family: str) -> int:
        """The version `family`'s candidate model holds (0: none)."""
        return self.candidates[family].latest()

    def load_version(self, uri: str, family: str = "", after: int = 0) -> VersionInfo:
        """Writes version N+1 of `family` (empty: the default) and loads it; traffic moves once it is ready, the old
        version drains and unloads. A version that fails to load is removed again and the old one keeps serving."""
        family = family or self.default
        repository = self.repositories[family]
        with self._triton_lock:
            added = repository.add_version(uri, version=self.next_version(family, after))
            try:
                from tritonclient.utils import InferenceServerException

                try:
                    self.control.load_model(family)
                except InferenceServerException as exc:
                    if "UNAVAILABLE" in str(exc.status()):
                        raise DependencyUnavailable(f"Triton is unavailable: {exc.message()}") from None
                    raise FailedPrecondition(f"version {added.version} failed to load: {exc.message()}") from None
                if not self.control.is_model_ready(family, str(added.version), client_timeout=10):
                    raise FailedPrecondition(f"version {added.version} is not ready after loading")
            except BaseException:
                repository.remove_version(added.version)
                raise
        log.info("model version loaded", extra={"model": family, "version": added.version, "uri": added.uri})
        self._publish_serving(family, added)
        return VersionInfo(added.version, added.uri, "READY", active=True, model=family)

    def _load_triton(self, name: str, version: int) -> None:
        """Triton's load_model of `name` and `version` ready after it; DependencyUnavailable or FailedPrecondition."""
        from tritonclient.utils import InferenceServerException

        try:
            self.control.load_model(name)
        except InferenceServerException as exc:
            if "UNAVAILABLE" in str(exc.status()):
                raise DependencyUnavailable(f"Triton is unavailable: {exc.message()}") from None
            raise FailedPrecondition(f"version {version} failed to load: {exc.message()}") from None
        if not self.control.is_model_ready(name, str(version), client_timeout=10):
            raise FailedPrecondition(f"version {version} is not ready after loading")

    def _unload_candidate(self, family: str) -> None:
        try:
            self.control.unload_model(self.candidates[family].name)
        except Exception as exc:  # the folder goes anyway; Triton drops a model whose folder is gone
            log.warning("Triton could not unload the candidate of %s: %s", family, exc)

    def load_candidate(self, uri: str, family: str = "", after: int = 0) -> VersionInfo:
        """Writes the next version of `family` into its candidate model and loads it there, beside the serving
        version: no traffic moves (only requests pinning its number reach it). One candidate per family: another is
        FailedPrecondition naming it. A candidate that fails to load is removed again."""
        family = family or self.default
        candidates = self.candidates[family]
        with self._triton_lock:
            waiting = candidates.latest()
            if waiting:
                raise FailedPrecondition(
                    f"{family} already has candidate version {waiting}: promote or discard it first"
                )
            candidates.render(self.settings)
            added = candidates.add_version(uri, version=self.next_version(family, after))
            try:
                self._load_triton(candidates.name, added.version)
            except BaseException:
                candidates.remove_version(added.version)
                self._unload_candidate(family)
                raise
        log.info("candidate version loaded", extra={"model": family, "version": added.version, "uri": added.uri})
        return VersionInfo(added.version, added.uri, "READY", model=family, candidate=True)

    def _candidate(self, family: str, version: int) -> RepoVersion:
        found = next((v for v in self.candidates[family].versions() if v.version == version), None)
        if found is None:
            waiting = self.candidates[family].latest()
            has = f"its candidate is version {waiting}" if waiting else "it has no candidate"
            raise FailedPrecondition(f"version: {family} version {version} is not a candidate ({has})")
        return found

    def promote_version(self, family: str, version: int) -> VersionInfo:
        """The candidate `version` becomes the serving version of `family` under its number (the family model
        loads it as its newest folder; the old version finishes its in-flight requests and unloads), then the
        candidate model is unloaded. A load that fails leaves the candidate as it was."""
        family = family or self.default
        repository, candidates = self.repositories[family], self.candidates[family]
        with self._triton_lock:
            self._candidate(family, version)
            moved = repository.take_version(candidates, version)
            try:
                self._load_triton(family, version)
            except BaseException:
                os.rename(repository.model_dir / str(version), candidates.model_dir / str(version))
                raise
            self._unload_candidate(family)
        log.info("candidate version promoted", extra={"model": family, "version": version, "uri": moved.uri})
        self._publish_serving(family, moved)
        return VersionInfo(version, moved.uri, "READY", active=True, model=family)

    def discard_version(self, family: str, version: int, reason: str = "") -> VersionInfo:
        """Unloads the candidate `version` of `family` and removes its folder; its number is kept as discarded
        (never served, never reused). The serving version is untouched."""
        family = family or self.default
        candidates = self.candidates[family]
        with self._triton_lock:
            found = self._candidate(family, version)
            candidates.mark_discarded(version, reason)
            self._unload_candidate(family)
            candidates.remove_version(version)
        log.info("candidate version discarded", extra={"model": family, "version": version, "reason": reason})
        return VersionInfo(version, found.uri, "UNLOADED", reason, model=family, candidate=True)

    def list_versions(self, family: str = "") -> list[VersionInfo]:
        """The versions of `family` (empty: of every served family, in the order served)."""
        names = [family] if family else list(self.families)
        states: dict[tuple[str, int], tuple[str, str]] = {}
        try:
            index = self.control.get_model_repository_index(as_json=True, client_timeout=5)
            wanted = {*names, *(self.candidates[n].name for n in names)}
            for entry in index.get("models", []):
                if entry.get("name") in wanted and entry.get("version"):
                    key = (entry["name"], int(entry["version"]))
                    states[key] = (entry.get("state", ""), entry.get("reason", ""))
        except Exception as exc:
            raise DependencyUnavailable(f"Triton is unavailable: {exc}") from None
        out = []
        for name in names:
            ready = [v for (n, v), (state, _) in states.items() if n == name and state == "READY"]
            active = max(ready) if ready else None
            for v in self.repositories[name].versions():
                state, reason = states.get((name, v.version), ("UNLOADED", ""))
                if state == "UNAVAILABLE" and reason == "unloaded":
                    state = "UNLOADED"
                out.append(VersionInfo(v.version, v.uri, state or "UNLOADED", reason, v.version == active, name))
            candidates = self.candidates[name]
            for v in candidates.versions():
                state, reason = states.get((candidates.name, v.version), ("UNLOADED", ""))
                out.append(VersionInfo(v.version, v.uri, state or "UNLOADED", reason, False, name, candidate=True))
        return out

    # --- generation ---

    def _client(self) -> Any:
        """One asyncio tritonclient per event loop."""
        import tritonclient.grpc.aio as taio

        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None:
            client = taio.InferenceServerClient(self.url)
            self._clients[id(loop)] = client
        return client

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(id(loop), None)
        if client is not None:
            await client.close()

    def _inputs(self, spec: GenerationSpec) -> list[Any]:
        from tritonclient.grpc import InferInput

        values = [
            ("PROMPT", "BYTES", np.array([[spec.prompt.encode()]], dtype=np.object_)),
            ("NEGATIVE_PROMPT", "BYTES", np.array([[spec.negative_prompt.encode()]], dtype=np.object_)),
            ("WIDTH", "INT32", np.array([[spec.width]], dtype=np.int32)),
            ("HEIGHT", "INT32", np.array([[spec.height]], dtype=np.int32)),
            ("STEPS", "INT32", np.array([[spec.steps]], dtype=np.int32)),
            ("GUIDANCE", "FP32", np.array([[spec.guidance]], dtype=np.float32)),
            ("SEED", "INT64", np.array([[spec.seed]], dtype=np.int64)),
            ("NUM_IMAGES", "INT32", np.array([[spec.num_images]], dtype=np.int32)),
            ("PREVIEW", "BOOL", np.array([[spec.preview]], dtype=np.bool_)),
        ]
        if spec.adapters:  # optional input: absent = no LoRA (services/sampler/lora.py)
            values.append(("ADAPTERS", "BYTES", np.array([[dump_adapters(spec.adapters).encode()]], dtype=np.object_)))
        inputs = []
        for name, dtype, array in values:
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _request(self, spec: GenerationSpec, request_id: str, priority: int | None = None) -> dict[str, Any]:
        """The Triton stream request of a spec: to the Triton model named as its family, pinned to
        `spec.model_version` when the request asked for one, at `priority` (0..9; None: the direct-call default)
        as Triton's level."""
        if priority is None:
            priority = self.settings.sampler.default_priority
        model_name = spec.model
        candidates = self.candidates.get(spec.model)
        if spec.model_version and candidates is not None and spec.model_version == candidates.latest():
            model_name = candidates.name  # pinned to the family's candidate version
        request: dict[str, Any] = {
            "model_name": model_name,
            "inputs": self._inputs(spec),
            "request_id": request_id,
            "priority": triton_priority(priority),
        }
        if spec.model_version:
            request["model_version"] = str(spec.model_version)
        return request

    async def stream(
        self, spec: GenerationSpec, timeout: float | None = None, priority: int | None = None
    ) -> AsyncIterator[Progress | Generated]:
        """Progress events, then one Generated. `timeout` (seconds) bounds the Triton stream; cancelling the
        consumer (client gone, deadline) cancels the stream, and the model stops between steps. `priority` 0..9
        orders Triton's queue (None: PONY_SAMPLER_DEFAULT_PRIORITY); a full queue is Overloaded."""
        client = self._client()
        # Our request id travels to Triton, so the model's log lines name the RPC they belong to.
        rid = request_id_var.get() or uuid.uuid4().hex
        request = self._request(spec, rid, priority)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        started = time.perf_counter()
        responses = client.stream_infer(requests(), stream_timeout=timeout)
        final = False  # the request's last response (images or error) has arrived
        generated: Generated | None = None
        try:
            async for result, error in responses:
                if error is not None:
                    final = True
                    raise _error_from_triton(error.message(), spec.model, spec.model_version)
                images = result.as_numpy("IMAGES")
                if images is None:
                    preview = result.as_numpy("PREVIEW")
                    yield Progress(
                        step=int(result.as_numpy("STEP").reshape(-1)[0]),
                        total=int(result.as_numpy("TOTAL").reshape(-1)[0]),
                        previews=list(preview[0]) if preview is not None else [],
                    )
                    continue
                final = True
                generated = Generated(
                    images=list(images[0]),
                    seeds=[int(s) for s in result.as_numpy("SEEDS").reshape(-1)],
                    model_version=result.get_response().model_version,
                    batch_size=int(result.as_numpy("BATCH").reshape(-1)[0]),
                    compute_s=float(result.as_numpy("COMPUTE_SECONDS").reshape(-1)[0]),
                    elapsed_s=time.perf_counter() - started,
                )
                break
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc(exc) from None
        finally:
            if final:
                # Let Triton close the finished stream itself: cancelling a stream whose request has completed
                # leaves the model version referenced in Triton 2.51 (it would never finish unloading).
                await _drain(responses)
            else:
                # Stopped early (client gone, deadline, error): the model sees is_cancelled() at its next step.
                responses.cancel()
        if generated is None:
            raise DependencyUnavailable("Triton closed the stream before the images were ready")
        yield generated
