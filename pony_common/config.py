"""The one settings object: every `PONY_*` environment variable, read once and passed explicitly."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("captioner", "scorer", "style_tagger", "safety", "trainer", "sampler")
PORTS = {
    "captioner": 50051,
    "scorer": 50052,
    "style_tagger": 50053,
    "safety": 50054,
    "trainer": 50055,
    "sampler": 50056,
}


class ConfigError(ValueError):
    """A `PONY_*` variable has a value that cannot be used."""


def _env_name(field_name: str) -> str:
    return "PONY_" + field_name.upper()


@dataclass(frozen=True)
class Settings:
    """All configuration. Field `foo_bar` is read from `PONY_FOO_BAR`; unset fields keep their default.

    Fields left empty ("") that name places under `state_dir` are filled in by `from_env`.
    """

    # --- where state lives (the embedded default: one folder) ---
    state_dir: str = ".pony"
    database_url: str = ""  # default sqlite:///<state_dir>/catalog.db
    broker_url: str = ""  # default sqla+sqlite:///<state_dir>/broker.db
    result_backend: str = ""  # default db+sqlite:///<state_dir>/results.db
    blob_url: str = ""  # default <state_dir>/blobs
    models_dir: str = ""  # default <state_dir>/models

    # --- models: Hugging Face id or local path; empty = <models_dir>/<name> ---
    captioner_model: str = ""
    scorer_model: str = ""
    scorer_head: str = ""
    style_tagger_model: str = ""
    safety_model: str = ""
    safety_head: str = ""
    sampler_model: str = ""
    device: str = "cpu"
    dtype: str = "float32"

    # --- service addresses (clients) ---
    captioner_addr: str = "127.0.0.1:50051"
    scorer_addr: str = "127.0.0.1:50052"
    style_tagger_addr: str = "127.0.0.1:50053"
    safety_addr: str = "127.0.0.1:50054"
    trainer_addr: str = "127.0.0.1:50055"
    sampler_addr: str = "127.0.0.1:50056"

    # --- gRPC servers ---
    bind_host: str = "0.0.0.0"
    auth_token: str = ""  # bearer token; empty = no auth
    tls_cert: str = ""  # PEM paths; both set = TLS on the server
    tls_key: str = ""
    tls_ca: str = ""  # clients: CA bundle to trust
    max_message_mb: int = 64
    max_concurrent_rpcs: int = 64
    shutdown_grace_s: float = 10.0
    rpc_timeout_s: float = 60.0
    rpc_retries: int = 5

    # --- images ---
    max_image_pixels: int = 64_000_000
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

    # --- Celery ---
    worker_concurrency: int = 1
    task_max_retries: int = 8
    task_retry_backoff_s: float = 1.0

    # --- observability ---
    log_level: str = "INFO"
    log_json: bool = True
    metrics_port: int = 0  # 0 = off; 9090 in the cluster
    otlp_endpoint: str = ""  # empty = tracing export off

    # --- captioner ---
    captioner_batch_size: int = 8
    captioner_max_new_tokens: int = 96
    captioner_fewshot_path: str = ""
    captioner_filler_path: str = ""
    artist_blocklist_path: str = ""

    # --- scorer ---
    scorer_batch_size: int = 32

    # --- style tagger ---
    style_k: int = 16
    style_tag_format: str = "style_cluster_{n}"
    style_max_artist_share: float = 0.5
    style_index: str = "faiss"  # faiss | pgvector

    # --- safety ---
    safety_blocked_tags_path: str = ""
    safety_explicit_threshold: float = 0.5
    safety_questionable_threshold: float = 0.5

    # --- trainer ---
    trainer_executor: str = "local"  # local | kubernetes
    trainer_namespace: str = "pony"
    trainer_pool_label: str = "pony.ai/pool"
    trainer_image: str = "pony-platform/cuda:0.1.0"

    # --- sampler / Triton ---
    triton_url: str = "127.0.0.1:8001"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_bin: str = ""  # empty = the binary bundled in the nvidia-pytriton wheel
    triton_repo: str = ""  # default <state_dir>/triton
    triton_start: bool = True  # single machine: the sampler starts tritonserver itself
    sampler_max_width: int = 1536
    sampler_max_height: int = 1536
    sampler_max_steps: int = 100
    sampler_max_images: int = 4

    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: typing.Any) -> Settings:
        """Reads `PONY_*` from `environ` (default: os.environ); keyword overrides win over both."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, typing.Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            name = _env_name(f.name)
            if name in env:
                values[f.name] = _parse(name, env[name], hints[f.name])
        known = {_env_name(f.name) for f in dataclasses.fields(cls)}
        values["extra"] = {k: v for k, v in env.items() if k.startswith("PONY_") and k not in known}
        values.update(overrides)
        return cls(**values).resolved()

    def resolved(self) -> Settings:
        """Fills the empty state paths from `state_dir`."""
        state = Path(self.state_dir).expanduser().absolute()
        defaults = {
            "database_url": f"sqlite:///{state / 'catalog.db'}",
            "broker_url": f"sqla+sqlite:///{state / 'broker.db'}",
            "result_backend": f"db+sqlite:///{state / 'results.db'}",
            "blob_url": str(state / "blobs"),
            "models_dir": str(state / "models"),
            "triton_repo": str(state / "triton"),
        }
        changes = {k: v for k, v in defaults.items() if not getattr(self, k)}
        return dataclasses.replace(self, state_dir=str(state), **changes) if changes else self

    def replace(self, **changes: typing.Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def addr(self, service: str) -> str:
        return getattr(self, f"{_service_key(service)}_addr")

    def port(self, service: str) -> int:
        return int(self.addr(service).rsplit(":", 1)[1])

    def model_path(self, service: str) -> str:
        """The model a service loads: `PONY_<SERVICE>_MODEL`, else its tiny/default folder in models_dir."""
        from pony_common.models.registry import model_path

        return model_path(self, service)


def _service_key(service: str) -> str:
    key = service.replace("-", "_")
    if key not in SERVICES:
        raise ConfigError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    return key


def _parse(name: str, raw: str, hint: typing.Any) -> typing.Any:
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin is tuple:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if hint is str or isinstance(hint, types.UnionType):
            return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return raw
