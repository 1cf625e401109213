"""The captioner's second engine: an OpenAI-compatible chat-completions server (vLLM, SGLang, `transformers serve`)
generates, each image sent inline as a base64 PNG data URL, many requests in flight so the server batches them
continuously. Same prompts and greedy decoding as the local engine."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
from PIL import Image

from pony_common.config import ConfigError, Settings
from pony_common.errors import Cancelled, DependencyUnavailable
from pony_common.metrics import BATCH_SIZE, MODEL_INFO
from pony_common.models.clip import weights_version
from pony_common.models.lifecycle import Model
from services.captioner.engines import SERVICE, CaptionTask, TaskResult

logger = logging.getLogger(__name__)

# Answers that mean "the server cannot take this now; retry later", not "this item is bad".
RETRY_LATER = frozenset({408, 429, 502, 503, 504})


class CaptionServerError(RuntimeError):
    """The server refused or failed one request (the item fails alone)."""


def image_data_url(image: Image.Image) -> str:
    """The image as a `data:image/png;base64,...` URL (lossless: the server sees the pixels the local engine would)."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_api_key(path: str) -> str:
    """The API key in file `path` (a mounted Secret), stripped; "" when no file is configured."""
    if not path:
        return ""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"PONY_CAPTIONER_OPENAI_API_KEY_FILE={path}: cannot read it: {exc.strerror or exc}") from None
    if not key:
        raise ConfigError(f"PONY_CAPTIONER_OPENAI_API_KEY_FILE={path} is empty")
    return key


class OpenAIEngine(Model):
    """Captions from `POST {base_url}/chat/completions`: one request per (image, kind), at most `concurrency` in flight
    across all callers. A server that cannot be reached, times out or answers 408/429/5xx-gateway makes the whole call
    UNAVAILABLE (retry later); any other refusal fails that item alone. `load()` reads the key and opens the client;
    it does not call the server."""

    def __init__(
        self,
        base_url: str,
        served_model: str,
        *,
        api_key_file: str = "",
        concurrency: int = 64,
        timeout_s: float = 300.0,
        template_version: str = "",
    ) -> None:
        super().__init__("captioner")
        if not base_url:
            raise ConfigError(
                "PONY_CAPTIONER_ENGINE=openai needs PONY_CAPTIONER_OPENAI_BASE_URL (e.g. http://vllm:8000/v1)"
            )
        self.base_url = base_url.rstrip("/") + "/"
        self.served_model = served_model
        self.api_key_file = api_key_file
        self.concurrency = max(1, int(concurrency))
        self.timeout_s = float(timeout_s)
        self.template_version = template_version
        self._client: httpx2.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        local = Path(served_model)
        self._version = weights_version(local) if local.is_dir() else ""

    @classmethod
    def from_settings(cls, settings: Settings, *, template_version: str = "") -> OpenAIEngine:
        c = settings.captioner
        return cls(
            c.openai_base_url,
            c.openai_model or settings.model_path("captioner"),
            api_key_file=c.openai_api_key_file,
            concurrency=c.openai_concurrency,
            timeout_s=c.openai_timeout_s,
            template_version=template_version,
        )

    # --- lifecycle ---

    def _load(self) -> None:
        key = read_api_key(self.api_key_file)
        self._client = httpx2.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=self.timeout_s,
            limits=httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            trust_env=False,  # the server is named by the settings; no proxy from the environment in between
        )
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="captioner-openai")
        MODEL_INFO.labels(SERVICE).info(
            {"model": self.model_id, "version": self.model_version, "template": self.template_version}
        )

    def _teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
        self._client = self._pool = None

    @property
    def model(self) -> OpenAIEngine:
        return self

    @property
    def model_id(self) -> str:
        return self.served_model

    @property
    def model_version(self) -> str:
        return self._version or "unknown"

    def close(self) -> None:
        self.teardown()

    # --- generation ---

    def complete(self, image_url: str, prompt: str, max_new_tokens: int) -> str:
        """One greedy chat completion: a user turn with the image, then the prompt (the local engine's order)."""
        client = self.loaded(self._client)
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "max_tokens": max(1, int(max_new_tokens)),
            "temperature": 0,
        }
        where = f"the caption server {self.base_url}"
        try:
            reply = client.post("chat/completions", json=body)
        except httpx2.TimeoutException:
            raise DependencyUnavailable(f"{where} did not answer within {self.timeout_s:g} s") from None
        except httpx2.TransportError as exc:
            raise DependencyUnavailable(f"{where} cannot be reached ({type(exc).__name__})") from None
        if reply.status_code in RETRY_LATER:
            raise DependencyUnavailable(f"{where} answered HTTP {reply.status_code}; retry later")
        if reply.status_code != 200:
            raise CaptionServerError(f"{where} answered HTTP {reply.status_code}: {reply.text[:200]}")
        try:
            content = reply.json()["choices"][0]["message"]["content"]
        except (ValueError, LookupError, TypeError):
            raise CaptionServerError(f"{where} sent no chat completion: {reply.text[:200]}") from None
        return content if isinstance(content, str) else ""

    def _row(self, task: CaptionTask, image_url: str, prompt: str, max_new_tokens: int) -> str:
        if task.stopped():
            raise Cancelled("caption request cancelled")
        return self.complete(image_url, prompt, max_new_tokens)

    def _start(self, tasks: Sequence[CaptionTask]) -> list[list[Future[str]] | BaseException]:
        """Every task's prompts queued on the shared pool (each image encoded once for all its prompts)."""
        pool = self.loaded(self._pool)
        BATCH_SIZE.labels(SERVICE, "openai").observe(sum(len(task.prompts) for task in tasks))
        started: list[list[Future[str]] | BaseException] = []
        for task in tasks:
            try:
                url = image_data_url(task.image)
            except (OSError, ValueError) as exc:
                started.append(exc)
                continue
            started.append([pool.submit(self._row, task, url, prompt, budget) for prompt, budget in task.prompts])
        return started

    @staticmethod
    def _collect(started: list[Future[str]] | BaseException) -> TaskResult:
        if isinstance(started, BaseException):
            return started
        texts = []
        for future in started:
            error = future.exception()
            if error is not None:
                return error
            texts.append(future.result())
        return texts

    def generate(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """All prompts of all tasks in flight at once (up to `concurrency`), waiting in the caller's thread."""
        return [self._collect(started) for started in self._start(tasks)]

    async def submit(self, tasks: Sequence[CaptionTask]) -> list[TaskResult]:
        """As `generate`, awaited; a cancelled caller's requests that have not started are dropped."""
        started = await asyncio.to_thread(self._start, tasks)
        futures = [future for s in started if not isinstance(s, BaseException) for future in s]
        try:
            if futures:
                await asyncio.wait([asyncio.wrap_future(future) for future in futures])
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        return [self._collect(s) for s in started]
