"""The one settings object: every `PONY_*` environment variable, read once and passed explicitly.

Shared settings (state, addresses, transport, images, Celery, observability) are fields of `Settings`; what one
service alone reads is its own section (`settings.captioner.batch_size` from `PONY_CAPTIONER_BATCH_SIZE`).
A setting's name everywhere (environment, `from_env`/`replace` keywords) is its env name without `PONY_`,
lower-cased: `replace(captioner_batch_size=4)` changes `settings.captioner.batch_size`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Iterator, Mapping
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
# Folder names under PONY_MODELS_DIR, as written by `ponyctl models tiny`.
MODEL_DIRS = {
    "captioner": "vlm",
    "scorer": "clip",
    "style_tagger": "clip",
    "safety": "clip",
    "sampler": "auraflow",
    "trainer": "auraflow",
}
HEAD_DIRS = {"scorer": "heads/aesthetic", "safety": "heads/nsfw"}


class ConfigError(ValueError):
    """A `PONY_*` variable has a value that cannot be used."""


def env(name: str) -> dict[str, str]:
    """Field metadata: this field's env name does not follow its section's prefix."""
    return {"env": name}


@dataclass(frozen=True)
class Section:
    """A service's own settings; field `foo` is read from `PONY_<PREFIX>FOO` unless its metadata names another."""

    PREFIX: typing.ClassVar[str] = ""

    def replace(self, **changes: typing.Any) -> typing.Self:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CaptionerSettings(Section):
    PREFIX: typing.ClassVar[str] = "CAPTIONER_"
    model: str = ""  # VLM (Florence-2, InternVL, Qwen2.5-VL, LLaVA) id or path; empty = <models_dir>/vlm
    batch_size: int = 16  # images per model batch (all their kinds' prompts); concurrent calls are merged up to it
    batch_delay_ms: float = 5.0  # how long a model batch waits for more calls' images once its first one arrived
    max_new_tokens: int = 320  # cap on new tokens for every kind (each kind has its own budget below it)
    fewshot_path: str = ""  # empty = the default examples shipped in services/captioner/data
    filler_path: str = ""  # empty = the default filler openings shipped in services/captioner/data
    artist_blocklist_path: str = field(default="", metadata=env("PONY_ARTIST_BLOCKLIST_PATH"))  # one artist per line
    fewshot_per_prompt: int = 2  # curated example captions put in each prompt
    max_items: int = 256  # items per Caption/CaptionStream call
    engine: str = "transformers"  # transformers (the VLM in this process) | openai (an OpenAI-compatible server)
    openai_base_url: str = ""  # engine openai: the server's API root, e.g. http://vllm:8000/v1 (vLLM, SGLang)
    openai_model: str = ""  # engine openai: the model name the server serves; empty = the captioner model setting
    openai_api_key_file: str = ""  # engine openai: file holding the API key (a mounted Secret); empty = no key
    openai_concurrency: int = 64  # engine openai: requests in flight to the server (it batches them continuously)
    openai_timeout_s: float = 300.0  # engine openai: one chat-completions request


@dataclass(frozen=True)
class ScorerSettings(Section):
    PREFIX: typing.ClassVar[str] = "SCORER_"
    model: str = ""  # CLIP ViT-L/14 id or path (openai/clip-vit-large-patch14); empty = <models_dir>/clip
    head: str = ""  # aesthetic head: our head folder or a LAION .pth; empty = <models_dir>/heads/aesthetic
    batch_size: int = 32  # images per CLIP batch; concurrent calls are merged up to it (dynamic batcher)
    batch_delay_ms: float = 2.0  # how long a CLIP batch waits for more calls' images once its first one arrived
    max_batch: int = 1024  # images or embeddings per call
    head_from_catalog: bool = True  # at start, load the head marked active in aesthetic_heads if any
    elo_k: float = 32.0
    pair_sample: int = 256  # candidates NextPair looks at per try
    fit_epochs: int = 60
    fit_holdout: float = 0.2
    fit_max_rated: int = 20000  # images with a score but no comparison used for regression in FitHead


@dataclass(frozen=True)
class StyleTaggerSettings(Section):
    PREFIX: typing.ClassVar[str] = "STYLE_"
    model: str = field(default="", metadata=env("PONY_STYLE_TAGGER_MODEL"))  # style image encoder (CLIP or ViT)
    k: int = 16
    max_artist_share: float = 0.5
    index: str = "faiss"  # faiss | pgvector
    max_batch: int = 256  # images per Embed/Tag/Palette call
    batch_size: int = 32  # images per encoder batch; concurrent calls are merged up to it (dynamic batcher)
    batch_delay_ms: float = 2.0  # how long an encoder batch waits for more calls' images once its first one arrived
    fit_max_points: int = 200_000  # k-means runs on at most this many embeddings (all are assigned)
    palette_colors: int = 3  # palette tags per image in Tag
    examples: int = 4  # example image ids per cluster in SimilarStyles


@dataclass(frozen=True)
class SafetySettings(Section):
    PREFIX: typing.ClassVar[str] = "SAFETY_"
    model: str = ""  # CLIP id or path for the NSFW head; empty = <models_dir>/clip
    head: str = ""  # NSFW head folder; empty = <models_dir>/heads/nsfw
    blocked_tags_path: str = ""
    explicit_threshold: float = 0.5
    questionable_threshold: float = 0.5
    ambiguous_explicit: str = "block"  # block | flag: explicit content with an age-ambiguous character
    max_batch: int = 256  # items per Check call
    batch_size: int = 32  # images per CLIP batch; concurrent calls are merged up to it (dynamic batcher)
    batch_delay_ms: float = 2.0  # how long a CLIP batch waits for more calls' images once its first one arrived


@dataclass(frozen=True)
class TrainerSettings(Section):
    PREFIX: typing.ClassVar[str] = "TRAINER_"
    executor: str = "local"  # local | kubernetes
    namespace: str = "pony"
    pool_label: str = "pony.ai/pool"
    image: str = "pony-platform/cuda:0.1.0"
    models_pvc: str = "pony-models"  # training Jobs mount it read-only at PONY_MODELS_DIR; empty = tiny models
    blobs_pvc: str = ""  # PVC mounted at a local-path PONY_BLOB_URL in training Jobs (dev); empty = none
    output_dir: str = ""  # run outputs (checkpoints, final pipeline); default <state_dir>/runs
    kube_url: str = ""  # Kubernetes API URL; empty = in-cluster config, else the kubeconfig
    resync_s: float = 10.0  # the controller relists Jobs at least this often
    publish_model: str = "pony_v7"  # model_versions name a finished run publishes
    local_launcher: str = "auto"  # local executor: auto (torchrun when >1 process) | torchrun | python
    roots: tuple[str, ...] = ()  # spec paths may also name these folders/URL prefixes (besides runs, models, export)
    registries: tuple[str, ...] = ()  # registry (or registry/namespace) prefixes for resources.image; empty = image's
    gpu_memory_gib: float = 80.0  # memory of one training-pool GPU: SubmitRun refuses a GPU spec whose plan exceeds it
    gpu_memory_headroom: float = 0.1  # fraction of gpu_memory_gib the plan keeps free (allocator cache, fragmentation)


@dataclass(frozen=True)
class SamplerSettings(Section):
    PREFIX: typing.ClassVar[str] = "SAMPLER_"
    model: str = ""  # AuraFlow pipeline folder or id loaded into Triton as pony_v7; empty = <models_dir>/auraflow
    triton_url: str = field(default="127.0.0.1:8001", metadata=env("PONY_TRITON_URL"))
    triton_http_port: int = field(default=8000, metadata=env("PONY_TRITON_HTTP_PORT"))
    triton_grpc_port: int = field(default=8001, metadata=env("PONY_TRITON_GRPC_PORT"))
    triton_metrics_port: int = field(default=8002, metadata=env("PONY_TRITON_METRICS_PORT"))
    triton_bin: str = field(default="", metadata=env("PONY_TRITON_BIN"))  # empty = the nvidia-pytriton binary
    triton_repo: str = field(default="", metadata=env("PONY_TRITON_REPO"))  # default <state_dir>/triton
    triton_start: bool = field(default=True, metadata=env("PONY_TRITON_START"))  # the sampler starts tritonserver
    triton_start_timeout_s: float = field(default=300.0, metadata=env("PONY_TRITON_START_TIMEOUT_S"))
    max_width: int = 1536
    max_height: int = 1536
    max_steps: int = 100
    max_images: int = 4
    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 28
    default_guidance: float = 3.5
    max_guidance: float = 20.0
    max_prompt_chars: int = 8192  # prompt and negative prompt, refused before tokenizing when longer
    negative_prompt: str = ""  # used when a request gives none
    safety: str = "required"  # required: every image checked, safety down -> UNAVAILABLE | off
    max_batch_size: int = 4  # requests Triton's dynamic batcher hands the model at once
    batch_delay_us: int = 2000  # how long the batcher waits to fill a batch
    instances: int = 1  # copies of each family's model Triton runs (instance_group count; each loads the pipeline)
    max_queue: int = 32  # requests Triton queues per model and priority level; more are refused (RESOURCE_EXHAUSTED)
    default_priority: int = 5  # Triton priority of a direct Generate call, 0 (lowest)..9; a job sends its own
    compile: bool = False  # torch.compile the transformer inside the Triton model
    compile_mode: str = "reduce-overhead"  # torch.compile mode: reduce-overhead / max-autotune use CUDA graphs on CUDA
    compile_shapes: str = ""  # shapes compiled and warmed at load, WxHxBATCH: "1024x1024x1,1024x1024x2"; others eager
    fp8: bool = False  # torchao float8 (dynamic activations and weights) of the denoiser's Linear layers; CUDA only
    fuse_qkv: bool = False  # fuse the denoiser's attention QKV projections (diffusers fuse_qkv_projections)
    preview_every: int = 1  # a request that asks for previews gets one every k steps (made on the device)
    encode_workers: int = 0  # threads encoding PNG/WebP off the event loop; 0 = min(4, CPUs)
    warmup: str = ""  # warm-up generations at load, e.g. "1024x1024x28,512x512x4"
    random_init: str = ""  # "full": random full-size weights instead of loading them (benchmarks)
    job_timeout_s: float = 600.0  # one generation job's GenerateStream deadline
    model_roots: tuple[str, ...] = ()  # LoadVersion may also name these folders/URL prefixes (besides models, runs)
    families: tuple[str, ...] = ("pony_v7",)  # families served (Triton models): pony_v7 (AuraFlow), pony_v6 (SDXL)
    default_model: str = "pony_v7"  # the family a request that names none goes to (one of `families`)
    v6_model: str = ""  # SDXL pipeline folder or id loaded into Triton as pony_v6; empty = <models_dir>/sdxl
    v6_default_width: int = 1024  # pony_v6's defaults (pony_v7's are the default_* settings above)
    v6_default_height: int = 1024
    v6_default_steps: int = 25
    v6_default_guidance: float = 7.0
    v6_negative_prompt: str = ""  # pony_v6's negative prompt when a request gives none
    max_adapters: int = 4  # LoRA adapters one request may apply (GenerateRequest.adapters)
    adapter_cache: int = 8  # LoRA adapters each Triton model instance keeps loaded (least recently used evicted)
    http_port: int = 0  # KServe v2 HTTP endpoint of the sampler (services/sampler/kserve_http.py); 0 = off


SECTIONS: dict[str, type[Section]] = {
    "captioner": CaptionerSettings,
    "scorer": ScorerSettings,
    "style_tagger": StyleTaggerSettings,
    "safety": SafetySettings,
    "trainer": TrainerSettings,
    "sampler": SamplerSettings,
}


def _env_name(field_name: str) -> str:
    return "PONY_" + field_name.upper()


def _section_env(section: type[Section], f: dataclasses.Field) -> str:
    return f.metadata.get("env") or f"PONY_{section.PREFIX}{f.name.upper()}"


def _sqlite_under(url: str, state: Path) -> str:
    """`url` with a relative SQLite path (sqlite:///catalog.db) taken under `state`; other URLs as they are."""
    scheme, sep, rest = url.partition(":///")
    path = rest.split("?", 1)[0]
    if not sep or not scheme.startswith("sqlite") or not path or path.startswith(("/", ":memory:", "file:")):
        return url
    return f"{scheme}:///{state / rest}"


@dataclass(frozen=True)
class Settings:
    """All configuration. Field `foo_bar` is read from `PONY_FOO_BAR`; unset fields keep their default.

    Fields left empty ("") that name places under `state_dir` are filled in by `from_env`.
    """

    # --- where state lives (the embedded default: one folder) ---
    state_dir: str = ".pony"  # the folder holding the embedded default's state
    database_url: str = ""  # default sqlite:///<state_dir>/catalog.db; a relative sqlite path is taken under state_dir
    broker_url: str = ""  # default sqla+sqlite:///<state_dir>/broker.db
    result_backend: str = ""  # default db+sqlite:///<state_dir>/results.db
    blob_url: str = ""  # default <state_dir>/blobs
    models_dir: str = ""  # default <state_dir>/models

    # --- models ---
    device: str = "cpu"  # torch device of the services: cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16 | float16
    model_load_attempts: int = 5  # tries of a service's model load; all failed = liveness NOT_SERVING (restart)
    model_load_backoff_s: float = 2.0  # wait before the second try; doubles per try, at most 60 s

    # --- service addresses (clients) ---
    captioner_addr: str = "127.0.0.1:50051"  # where clients find each service (host:port)
    scorer_addr: str = "127.0.0.1:50052"
    style_tagger_addr: str = "127.0.0.1:50053"
    safety_addr: str = "127.0.0.1:50054"
    trainer_addr: str = "127.0.0.1:50055"
    sampler_addr: str = "127.0.0.1:50056"

    # --- gRPC servers ---
    bind_host: str = "0.0.0.0"  # address the gRPC servers listen on; not loopback = tokens required
    auth_tokens: str = ""  # servers: role:token,... accepted (roles generate < worker < admin; each has the lower)
    auth_tokens_file: str = ""  # servers: the same, from a file (role:token lines) or a folder of files named by role
    auth_token: str = ""  # legacy single token: servers accept it as admin; clients send it without PONY_CLIENT_TOKEN*
    client_token: str = ""  # the bearer token this process's clients send (default: PONY_AUTH_TOKEN)
    client_token_file: str = ""  # the same, read from a file (a mounted Secret key)
    tls_cert: str = ""  # PEM paths; both set = TLS on the server
    tls_key: str = ""
    tls_ca: str = ""  # clients: CA bundle to trust
    health_port: int = 0  # with TLS: a plaintext port serving only grpc.health.v1 (kubelet probes speak plaintext)
    max_message_mb: int = 64  # gRPC message size limit, both directions
    max_concurrent_rpcs: int = 64  # calls served at once; more get RESOURCE_EXHAUSTED
    shutdown_grace_s: float = 10.0  # SIGTERM: how long in-flight calls may finish
    rpc_timeout_s: float = 60.0  # client deadline per call
    rpc_retries: int = 5  # client attempts on UNAVAILABLE (2..5)

    # --- images and tags ---
    max_image_pixels: int = 64_000_000  # larger images are refused (decompression bombs)
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # decoder allow-list, comma-separated
    image_roots: tuple[str, ...] = ()  # folders an ImageRef uri may name as a path; empty = blob keys and bytes only
    image_hosts: tuple[str, ...] = ()  # http(s) hosts (`host`, `host:port`, `*.domain`) ImageRef uris may fetch from
    image_max_bytes: int = 32_000_000  # cap on one image read from a blob key, path or URL; more is refused
    image_fetch_timeout_s: float = 10.0  # one image read from a path or URL must finish within this long
    request_max_pixels: int = 128_000_000  # pixels one request may have decoded at once (summed from headers first)
    request_max_image_bytes: int = 256 * 2**20  # image bytes one request may read, inline and by reference together
    style_tag_format: str = "style_cluster_{n}"  # style cluster tags in captions, exports and prompts

    # --- style-adherence evaluation (trainer controller; services/trainer/evaluation) ---
    eval_seeds: int = 2  # seeds per grid cell of `ponyctl eval style-adherence` (the default grid)
    eval_clusters: int = 4  # style clusters of the style tagger's set the default grid requests
    eval_after_publish: bool = False  # evaluate every version the trainer publishes, and compare it with the last
    eval_max_locking_regression: float = 0.0  # > 0: a published candidate whose locking regresses more is discarded

    # --- Celery ---
    worker_concurrency: int = 1  # processes per Celery worker
    task_max_retries: int = 8  # retries of a task whose service is UNAVAILABLE (curation stages wait without limit)
    task_retry_backoff_s: float = 1.0  # first retry delay; doubles per retry
    task_retry_max_backoff_s: float = 60.0  # longest delay between retries (a waiting curation stage tries this often)
    curation_batch_size: int = 64  # images per curation batch: one Celery task per stage, one gRPC call per service
    ingest_stall_s: float = 120.0  # ingest: stop waiting (exit 1) after this long with no progress and no worker
    ingest_max_member_bytes: int = 64 * 2**20  # ingest: largest source file or shard member read; larger: unreadable
    ingest_max_shard_bytes: int = 4 * 2**30  # ingest: decompressed bytes read per tar shard; members past: unreadable
    ingest_allowed_roots: tuple[str, ...] = ()  # ingest: folders, URL prefixes a manifest may name outside its folder
    broker_visibility_timeout_s: float = 300.0  # Redis: unacked messages of a dead worker come back after this long
    worker_heartbeat_file: str = ""  # default <state_dir>/worker.heartbeat; rewritten while a worker consumes (--probe)
    worker_heartbeat_s: float = 5.0  # how often the worker rewrites it; the probe fails once it is 3 intervals old

    # --- observability ---
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    log_json: bool = True  # one JSON object per log line (request id, trace id)
    metrics_port: int = 0  # 0 = off; 9090 in the cluster
    otlp_endpoint: str = ""  # empty = tracing export off; e.g. http://otel-collector:4317 (OTLP over gRPC)
    trace_sample_ratio: float = 1.0  # share of new traces recorded (a propagated parent's decision is kept)

    # --- per-service sections (see the classes above) ---
    captioner: CaptionerSettings = field(default_factory=CaptionerSettings)
    scorer: ScorerSettings = field(default_factory=ScorerSettings)
    style_tagger: StyleTaggerSettings = field(default_factory=StyleTaggerSettings)
    safety: SafetySettings = field(default_factory=SafetySettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)

    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def env_names(cls) -> Iterator[tuple[str, str | None, str]]:
        """(env name, section or None, attribute) for every setting."""
        for f in dataclasses.fields(cls):
            if f.name == "extra" or f.name in SECTIONS:
                continue
            yield _env_name(f.name), None, f.name
        for key, section in SECTIONS.items():
            for f in dataclasses.fields(section):
                yield _section_env(section, f), key, f.name

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: typing.Any) -> Settings:
        """Reads `PONY_*` from `environ` (default: os.environ); keyword overrides win over both. `PONY_X_FILE`
        names a file holding PONY_X (a mounted Secret, e.g. PONY_DATABASE_URL_FILE); PONY_X itself wins."""
        env_ = os.environ if environ is None else environ
        values: dict[str, typing.Any] = {}
        known = {name for name, _, _ in cls.env_names()}
        for name, section, attr in cls.env_names():
            raw = env_.get(name)
            if raw is None and f"{name}_FILE" in env_ and f"{name}_FILE" not in known:
                raw = _read_setting_file(f"{name}_FILE", env_[f"{name}_FILE"])
                known.add(f"{name}_FILE")
            if raw is not None:
                values[name[len("PONY_") :].lower()] = _parse(name, raw, _hint(section, attr))
        values.update(overrides)
        check_log_level(str(values.get("log_level", cls.log_level)))
        extra = {k: v for k, v in env_.items() if k.startswith("PONY_") and k not in known}
        return cls().replace(extra=extra, **values).resolved()

    def resolved(self) -> Settings:
        """Fills the empty state paths from `state_dir`."""
        state = Path(self.state_dir).expanduser().absolute()
        defaults = {
            "database_url": f"sqlite:///{state / 'catalog.db'}",
            "broker_url": f"sqla+sqlite:///{state / 'broker.db'}",
            "result_backend": f"db+sqlite:///{state / 'results.db'}",
            "blob_url": str(state / "blobs"),
            "models_dir": str(state / "models"),
            "worker_heartbeat_file": str(state / "worker.heartbeat"),
        }
        changes: dict[str, typing.Any] = {k: v for k, v in defaults.items() if not getattr(self, k)}
        if self.database_url and _sqlite_under(self.database_url, state) != self.database_url:
            changes["database_url"] = _sqlite_under(self.database_url, state)
        if not self.sampler.triton_repo:
            changes["sampler"] = self.sampler.replace(triton_repo=str(state / "triton"))
        return dataclasses.replace(self, state_dir=str(state), **changes) if changes else self

    def replace(self, **changes: typing.Any) -> Settings:
        """A copy with `changes`: top-level fields, whole sections, or any setting by its name (`sampler_safety`)."""
        top: dict[str, typing.Any] = {}
        nested: dict[str, dict[str, typing.Any]] = {}
        names = _flat_names()
        for key, value in changes.items():
            if key in _TOP_FIELDS:
                top[key] = value
            elif key in names:
                section, attr = names[key]
                nested.setdefault(section, {})[attr] = value
            else:
                raise TypeError(f"unknown setting {key!r}")
        for section, attrs in nested.items():
            top[section] = getattr(top.get(section) or self, section) if section in top else getattr(self, section)
            top[section] = top[section].replace(**attrs)
        return dataclasses.replace(self, **top)

    def addr(self, service: str) -> str:
        return getattr(self, f"{_service_key(service)}_addr")

    def port(self, service: str) -> int:
        return int(self.addr(service).rsplit(":", 1)[1])

    def model_path(self, service: str) -> str:
        """The model a service loads: `PONY_<SERVICE>_MODEL`, else its tiny/default folder in models_dir."""
        key = service.replace("-", "_")
        if key not in MODEL_DIRS:
            raise ConfigError(f"no model registered for service {service!r}")
        explicit = getattr(getattr(self, key), "model", "")
        return explicit or str(Path(self.models_dir) / MODEL_DIRS[key])

    def head_path(self, service: str) -> str:
        """`PONY_<SERVICE>_HEAD` when set, else `<models_dir>/heads/<name>`."""
        key = service.replace("-", "_")
        if key not in HEAD_DIRS:
            raise ConfigError(f"no head registered for service {service!r}")
        return getattr(self, key).head or str(Path(self.models_dir) / HEAD_DIRS[key])

    def to_env(self) -> dict[str, str]:
        """Every setting as `PONY_*` variables (what a child process reads back into equal settings)."""
        out: dict[str, str] = {}
        for name, section, attr in self.env_names():
            value = getattr(getattr(self, section) if section else self, attr)
            if isinstance(value, bool):
                out[name] = "1" if value else "0"
            elif isinstance(value, tuple):
                out[name] = ",".join(value)
            else:
                out[name] = str(value)
        out.update({k: str(v) for k, v in self.extra.items()})
        return out


_TOP_FIELDS = {f.name for f in dataclasses.fields(Settings)}


def _flat_names() -> dict[str, tuple[str, str]]:
    return {name[len("PONY_") :].lower(): (section, attr) for name, section, attr in Settings.env_names() if section}


def _read_setting_file(name: str, path: str) -> str:
    try:
        return Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r} ({exc.strerror or exc})") from None


def _hint(section: str | None, attr: str) -> typing.Any:
    cls = SECTIONS[section] if section else Settings
    return typing.get_type_hints(cls)[attr]


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


# --- the log level and unknown variables (checked where a process starts: `ponyctl`, hence serve and worker) ---

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# `PONY_*` names read by name outside Settings: the test suite's (PONY_TEST_*, PONY_REQUIRE_SERVICES) and the
# training entrypoint's spec (`--spec env:PONY_TRAIN_SPEC`). They are not settings, and not misspellings either.
NOT_SETTINGS = ("PONY_TEST_", "PONY_REQUIRE_SERVICES", "PONY_TRAIN_SPEC")


def check_log_level(level: str) -> str:
    """`level` upper-cased, or ConfigError naming the valid levels."""
    if level.strip().upper() not in LOG_LEVELS:
        raise ConfigError(f"PONY_LOG_LEVEL={level!r} is not a log level; use one of {', '.join(LOG_LEVELS)}")
    return level.strip().upper()


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One sentence per `PONY_*` name in `environ` (`Settings.extra`, or a whole environment) that is no setting,
    naming the closest setting if there is one."""
    known = [name for name, _, _ in Settings.env_names()]
    out = []
    for name in sorted(environ):
        if not name.startswith("PONY_") or name in known or name.startswith(NOT_SETTINGS):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else 'the settings are listed in README.md, "Configuration"'
        out.append(f"{name} is not a setting; {hint}")
    return out


def warn_unknown_variables(settings: Settings) -> list[str]:
    """Logs a warning for each unknown `PONY_*` name once (a misspelt setting is otherwise silently ignored).
    Called where a process starts from its environment (`ponyctl`, so `serve` and `worker` too), not by
    library code that tests hand synthetic environments."""
    messages = unknown_variables(settings.extra)
    for message in messages:
        logging.getLogger(__name__).warning(message)
    return messages
