"""The V7 model as Triton serves it, on the shared `Model` lifecycle: repository, the tritonserver process (single
machine), model loading and versions, and streaming generation over Triton's gRPC API. Knows nothing of our gRPC
servers or the catalog."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from pony_common.config import Settings
from pony_common.errors import Cancelled, DependencyUnavailable, FailedPrecondition, InvalidArgument
from pony_common.logs import request_id_var
from pony_common.metrics import MODEL_INFO
from pony_common.models.lifecycle import Model
from pony_common.models.sources import require_model_source
from services.sampler.generation import Generated, GenerationSpec, Progress
from services.sampler.repository import MODEL_NAME, ModelRepository, RepoVersion
from services.sampler.triton_server import TritonProcess

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 1.0
DRAIN_TIMEOUT_S = 5.0
_NOT_LOADED = ("unknown model", "is not found", "not ready", "no available version", "is not loaded")


@dataclass(frozen=True)
class VersionInfo:
    """A version in the repository and its state in Triton (READY, LOADING, UNAVAILABLE, UNLOADED, ...)."""

    version: int
    uri: str
    state: str
    reason: str = ""
    active: bool = False


def _error_from_triton(message: str) -> Exception:
    """A domain error for a per-request error message from Triton or from model.py."""
    low = message.lower()
    if low.startswith("invalid_argument:"):
        detail = message.split(":", 1)[1].strip()
        field, _, reason = detail.partition(":")
        return InvalidArgument(field.strip() or "request", reason.strip() or detail)
    if "cancelled" in low:
        return Cancelled("generation cancelled")
    if any(marker in low for marker in _NOT_LOADED):
        return DependencyUnavailable(f"model {MODEL_NAME} is not loaded in Triton")
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
    """`load()` reads the tokenizer, renders the repository, starts tritonserver when configured to, loads
    `pony_v7` and keeps it loaded (a watchdog restarts a dead server and reloads a missing model); `stream()`
    generates; `teardown()` stops the watchdog and the tritonserver it started."""

    def __init__(self, settings: Settings, *, process: TritonProcess | None = None) -> None:
        super().__init__("sampler")
        self.settings = settings
        self.repository = ModelRepository(settings.sampler.triton_repo)
        self.process = (
            process if process is not None else (TritonProcess(settings) if settings.sampler.triton_start else None)
        )
        self.url = self.process.grpc_url if self.process is not None else settings.sampler.triton_url
        self.tokenizer: Any = None
        self._control: Any = None
        self._triton_lock = threading.Lock()  # one Triton load_model at a time (start, watchdog, new versions)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._clients: dict[int, Any] = {}

    # --- lifecycle ---

    @property
    def model_id(self) -> str:
        return self.settings.model_path("sampler")

    def _load(self) -> None:
        """The tokenizer (prompt token limits) of the configured model, then Triton. A load that fails stops what
        it started here (`teardown()` only tears down a model that finished loading)."""
        from transformers import AutoTokenizer

        path = require_model_source(self.model_id, "sampler")
        self.tokenizer = AutoTokenizer.from_pretrained(f"{path}/tokenizer")
        try:
            self._start()
        except BaseException:
            self._teardown()
            raise

    def _start(self) -> None:
        """Renders the repository, starts tritonserver when configured to, loads the model, starts the watchdog."""
        self.repository.render(self.settings)
        if self.process is not None:
            self.process.start()
        self._wait_live(self.settings.sampler.triton_start_timeout_s)
        if self._serving_latest():
            log.info("Triton already serves the latest version of %s", MODEL_NAME)
            self._publish_serving()
        else:
            self.load_model()
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

    def _serving_latest(self) -> bool:
        """True when Triton already has the repository's newest version ready (another sampler loaded it)."""
        latest = self.repository.latest()
        try:
            return latest > 0 and bool(self.control.is_model_ready(MODEL_NAME, str(latest), client_timeout=5))
        except Exception:
            return False

    def load_model(self) -> None:
        """Explicit model control: (re)loads `pony_v7`; Triton serves the latest version folder."""
        from tritonclient.utils import InferenceServerException

        with self._triton_lock:
            started = time.perf_counter()
            try:
                self.control.load_model(MODEL_NAME)
            except InferenceServerException as exc:
                raise DependencyUnavailable(f"Triton could not load {MODEL_NAME}: {exc.message()}") from None
            log.info("model loaded", extra={"model": MODEL_NAME, "s": round(time.perf_counter() - started, 2)})
        self._publish_serving()

    def _publish_serving(self, version: RepoVersion | None = None) -> None:
        """The model-info metric names the version that serves now (default: the repository's latest)."""
        if version is None:
            versions = self.repository.versions()
            if not versions:
                return
            version = versions[-1]
        info = {"model": MODEL_NAME, "version": str(version.version), "uri": version.source or version.uri}
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
        if not self.control.is_model_ready(MODEL_NAME, client_timeout=5):
            log.warning("model %s is not ready in Triton; loading it", MODEL_NAME)
            self.load_model()

    # --- versions ---

    def load_version(self, uri: str) -> VersionInfo:
        """Writes version N+1 and loads it; traffic moves once it is ready, the old version drains and unloads.
        A version that fails to load is removed again and the old one keeps serving."""
        with self._triton_lock:
            added = self.repository.add_version(uri)
            try:
                from tritonclient.utils import InferenceServerException

                try:
                    self.control.load_model(MODEL_NAME)
                except InferenceServerException as exc:
                    if "UNAVAILABLE" in str(exc.status()):
                        raise DependencyUnavailable(f"Triton is unavailable: {exc.message()}") from None
                    raise FailedPrecondition(f"version {added.version} failed to load: {exc.message()}") from None
                if not self.control.is_model_ready(MODEL_NAME, str(added.version), client_timeout=10):
                    raise FailedPrecondition(f"version {added.version} is not ready after loading")
            except BaseException:
                self.repository.remove_version(added.version)
                raise
        log.info("model version loaded", extra={"model": MODEL_NAME, "version": added.version, "uri": added.uri})
        self._publish_serving(added)
        return VersionInfo(added.version, added.uri, "READY", active=True)

    def list_versions(self) -> list[VersionInfo]:
        states: dict[int, tuple[str, str]] = {}
        try:
            index = self.control.get_model_repository_index(as_json=True, client_timeout=5)
            for entry in index.get("models", []):
                if entry.get("name") == MODEL_NAME and entry.get("version"):
                    states[int(entry["version"])] = (entry.get("state", ""), entry.get("reason", ""))
        except Exception as exc:
            raise DependencyUnavailable(f"Triton is unavailable: {exc}") from None
        ready = [v for v, (state, _) in states.items() if state == "READY"]
        active = max(ready) if ready else None
        out = []
        for v in self.repository.versions():
            state, reason = states.get(v.version, ("UNLOADED", ""))
            if state == "UNAVAILABLE" and reason == "unloaded":
                state = "UNLOADED"
            out.append(VersionInfo(v.version, v.uri, state or "UNLOADED", reason, v.version == active))
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
        inputs = []
        for name, dtype, array in values:
            tensor = InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    async def stream(self, spec: GenerationSpec, timeout: float | None = None) -> AsyncIterator[Progress | Generated]:
        """Progress events, then one Generated. `timeout` (seconds) bounds the Triton stream; cancelling the
        consumer (client gone, deadline) cancels the stream, and the model stops between steps."""
        client = self._client()
        # Our request id travels to Triton, so the model's log lines name the RPC they belong to.
        rid = request_id_var.get() or uuid.uuid4().hex
        request = {"model_name": MODEL_NAME, "inputs": self._inputs(spec), "request_id": rid}

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
                    raise _error_from_triton(error.message())
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
