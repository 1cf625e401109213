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
    state_dir: str = ".pony"  # the folder holding the embedded default's state
    database_url: str = ""  # default sqlite:///<state_dir>/catalog.db
    broker_url: str = ""  # default sqla+sqlite:///<state_dir>/broker.db
    result_backend: str = ""  # default db+sqlite:///<state_dir>/results.db
    blob_url: str = ""  # default <state_dir>/blobs
    models_dir: str = ""  # default <state_dir>/models

    # --- models: Hugging Face id or local path; empty = <models_dir>/<name> ---
    captioner_model: str = ""  # VLM (Florence-2, InternVL, Qwen2.5-VL, LLaVA) id or path
    scorer_model: str = ""  # CLIP ViT-L/14 id or path (openai/clip-vit-large-patch14)
    scorer_head: str = ""  # aesthetic head: our head folder or a LAION .pth; empty = <models_dir>/heads/aesthetic
    style_tagger_model: str = ""  # style image encoder (CLIP or ViT) id or path
    safety_model: str = ""  # CLIP id or path for the NSFW head
    safety_head: str = ""  # NSFW head folder; empty = <models_dir>/heads/nsfw
    sampler_model: str = ""  # AuraFlow pipeline folder or id loaded into Triton as pony_v7
    device: str = "cpu"  # torch device of the services: cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16

    # --- service addresses (clients) ---
    captioner_addr: str = "127.0.0.1:50051"  # where clients find each service (host:port)
    scorer_addr: str = "127.0.0.1:50052"
    style_tagger_addr: str = "127.0.0.1:50053"
    safety_addr: str = "127.0.0.1:50054"
    trainer_addr: str = "127.0.0.1:50055"
    sampler_addr: str = "127.0.0.1:50056"

    # --- gRPC servers ---
    bind_host: str = "0.0.0.0"  # address the gRPC servers listen on
    auth_token: str = ""  # bearer token; empty = no auth
    tls_cert: str = ""  # PEM paths; both set = TLS on the server
    tls_key: str = ""
    tls_ca: str = ""  # clients: CA bundle to trust
    health_port: int = 0  # with TLS: a plaintext port serving only grpc.health.v1 (kubelet probes speak plaintext)
    max_message_mb: int = 64  # gRPC message size limit, both directions
    max_concurrent_rpcs: int = 64  # calls served at once; more get RESOURCE_EXHAUSTED
    shutdown_grace_s: float = 10.0  # SIGTERM: how long in-flight calls may finish
    rpc_timeout_s: float = 60.0  # client deadline per call
    rpc_retries: int = 5  # client attempts on UNAVAILABLE (2..5)

    # --- images ---
    max_image_pixels: int = 64_000_000  # larger images are refused (decompression bombs)
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # decoder allow-list, comma-separated

    # --- Celery ---
    worker_concurrency: int = 1  # processes per Celery worker
    task_max_retries: int = 8  # retries of a task whose service is UNAVAILABLE
    task_retry_backoff_s: float = 1.0  # first retry delay; doubles per retry

    # --- observability ---
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    log_json: bool = True  # one JSON object per log line (request id, trace id)
    metrics_port: int = 0  # 0 = off; 9090 in the cluster
    otlp_endpoint: str = ""  # empty = tracing export off; e.g. http://otel-collector:4317 (OTLP over gRPC)
    trace_sample_ratio: float = 1.0  # share of new traces recorded (a propagated parent's decision is kept)

    # --- captioner ---
    captioner_batch_size: int = 8
    captioner_max_new_tokens: int = 320  # cap on new tokens for every kind (each kind has its own budget below it)
    captioner_fewshot_path: str = ""  # empty = the default examples shipped in services/captioner/data
    captioner_filler_path: str = ""  # empty = the default filler openings shipped in services/captioner/data
    artist_blocklist_path: str = ""  # one artist name per line; empty = no blocklist
    captioner_fewshot_per_prompt: int = 2  # curated example captions put in each prompt
    captioner_max_items: int = 256  # items per Caption/CaptionStream call

    # --- scorer ---
    scorer_batch_size: int = 32
    scorer_max_batch: int = 1024  # images or embeddings per call
    scorer_head_from_catalog: bool = True  # at start, load the head marked active in aesthetic_heads if any
    scorer_elo_k: float = 32.0
    scorer_pair_sample: int = 256  # candidates NextPair looks at per try
    scorer_fit_epochs: int = 60
    scorer_fit_holdout: float = 0.2
    scorer_fit_max_rated: int = 20000  # images with a score but no comparison used for regression in FitHead

    # --- style tagger ---
    style_k: int = 16
    style_tag_format: str = "style_cluster_{n}"
    style_max_artist_share: float = 0.5
    style_index: str = "faiss"  # faiss | pgvector
    style_max_batch: int = 256  # images per Embed/Tag/Palette call
    style_fit_max_points: int = 200_000  # k-means runs on at most this many embeddings (all are assigned)
    style_palette_colors: int = 3  # palette tags per image in Tag
    style_examples: int = 4  # example image ids per cluster in SimilarStyles

    # --- safety ---
    safety_blocked_tags_path: str = ""
    safety_explicit_threshold: float = 0.5
    safety_questionable_threshold: float = 0.5
    safety_ambiguous_explicit: str = "block"  # block | flag: explicit content with an age-ambiguous character
    safety_max_batch: int = 256  # items per Check call

    # --- trainer ---
    trainer_executor: str = "local"  # local | kubernetes
    trainer_namespace: str = "pony"
    trainer_pool_label: str = "pony.ai/pool"
    trainer_image: str = "pony-platform/cuda:0.1.0"
    trainer_models_pvc: str = "pony-models"  # training Jobs mount it read-only at PONY_MODELS_DIR; empty = tiny models
    trainer_blobs_pvc: str = ""  # PVC mounted at a local-path PONY_BLOB_URL in training Jobs (dev); empty = none
    trainer_output_dir: str = ""  # run outputs (checkpoints, final pipeline); default <state_dir>/runs
    trainer_kube_url: str = ""  # Kubernetes API URL; empty = in-cluster config, else the kubeconfig
    trainer_resync_s: float = 10.0  # the controller relists Jobs at least this often
    trainer_publish_model: str = "pony_v7"  # model_versions name a finished run publishes
    trainer_local_launcher: str = "auto"  # local executor: auto (torchrun when >1 process) | torchrun | python

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
    sampler_default_width: int = 1024
    sampler_default_height: int = 1024
    sampler_default_steps: int = 28
    sampler_default_guidance: float = 3.5
    sampler_max_guidance: float = 20.0
    sampler_negative_prompt: str = ""  # used when a request gives none
    sampler_safety: str = "required"  # required: every image checked, safety down -> UNAVAILABLE | off
    sampler_max_batch_size: int = 4  # requests Triton's dynamic batcher hands the model at once
    sampler_batch_delay_us: int = 2000  # how long the batcher waits to fill a batch
    sampler_compile: bool = False  # torch.compile the transformer inside the Triton model
    sampler_warmup: str = ""  # warm-up generations at load, e.g. "1024x1024x28,512x512x4"
    sampler_random_init: str = ""  # "full": random full-size weights instead of loading them (benchmarks)
    sampler_job_timeout_s: float = 600.0  # one generation job's GenerateStream deadline
    triton_start_timeout_s: float = 300.0

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
