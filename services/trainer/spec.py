"""The training spec: a YAML/JSON document parsed into frozen dataclasses; bad fields raise InvalidArgument by name."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pony_common.access import Roots, allowed_registries, export_root, image_allowed, runs_root
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.fields import URI_MAX, check_text

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,28}[a-z0-9])?$")
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
CAPTION_KINDS = ("short", "medium", "long", "style")
OPTIMIZER_KINDS = ("adamw", "adamw8bit")
SHARDING_STRATEGIES = ("ddp", "fsdp")
# AuraFlow: VAE downsamples 8x and the transformer patches 2x2 latents, so sides are multiples of 16.
SIDE_MULTIPLE = 16
# The run output's subfolder holding the final diffusers pipeline (what gets published).
FINAL_DIR = "final"
# The LoRA weights file a LoRA run writes into FINAL_DIR (diffusers' name, what `load_lora_weights` looks for).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class StageSpec:
    """One resolution stage: aspect-ratio buckets of about `resolution`² pixels, trained for `steps` optimizer steps."""

    name: str
    resolution: int
    steps: int
    batch_size: int = 1
    learning_rate: float | None = None  # None = optimizer.learning_rate
    bucket_step: int = 64  # bucket sides are multiples of this (16 for tiny tests)
    max_aspect: float = 2.0
    # Flow shift of this stage: None = flow.shift; "auto" = resolution-dependent (SimpleTuner's auto shift); a number.
    shift: float | str | None = None


@dataclass(frozen=True)
class OptimizerSpec:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    kind: str = "adamw"  # adamw | adamw8bit (8-bit optimizer states)


@dataclass(frozen=True)
class CaptionSpec:
    """Per step: one caption kind sampled, tags shuffled and some dropped, special tags kept first."""

    kinds: tuple[str, ...] = CAPTION_KINDS
    prompt_probability: float = 0.25  # use the manifest's assembled `prompt` instead
    shuffle_tags: bool = True
    tag_dropout: float = 0.1
    keep_special_tags: bool = True
    empty_probability: float = 0.05  # unconditional (empty prompt) for classifier-free guidance


@dataclass(frozen=True)
class FlowSpec:
    """Rectified flow as FlowMatchEulerDiscreteScheduler samples it: shift None = the base model's scheduler shift."""

    shift: float | str | None = None  # a number, "auto" (resolution-dependent) or None
    weighting: str = "logit_normal"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class ShardingSpec:
    """How the transformer is spread over the ranks: `ddp` (a full replica each) or `fsdp` (PyTorch FSDP2
    `fully_shard`: parameters, gradients and optimizer states sharded; bf16 compute with fp32 master state)."""

    strategy: str = "ddp"  # ddp | fsdp
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # fsdp only: parameters, gradients and optimizer states live in host memory


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA (peft) on the AuraFlow transformer instead of a full fine-tune; saved as diffusers LoRA weights."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class ValidationSpec:
    """Validation images with fixed prompts and seeds every `every` steps (0 = only at each stage end); none when
    `prompts` is empty."""

    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    every: int = 0
    steps: int = 20
    guidance_scale: float = 3.5
    resolution: int = 0  # 0 = the stage's resolution


@dataclass(frozen=True)
class EmaSpec:
    enabled: bool = False
    decay: float = 0.999
    export: bool = True  # the final pipeline carries the EMA weights


@dataclass(frozen=True)
class CheckpointSpec:
    every: int = 500
    keep: int = 2


@dataclass(frozen=True)
class ResourceSpec:
    """Where the run executes in the cluster; ignored by the local executor except `processes_per_node`."""

    nodes: int = 1
    processes_per_node: int = 1  # torchrun --nproc-per-node; = GPUs per node on the training pool
    gpus_per_node: int = 0  # nvidia.com/gpu limit per pod (0 = CPU only)
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "8Gi"
    checkpoint_pvc: str = "pony-checkpoints"
    checkpoint_size: str = "100Gi"
    priority_class: str = "pony-training"
    image: str = ""  # empty = settings.trainer.image
    pool: str = "training"  # value of the settings.trainer.pool_label node label
    backoff_limit: int = 0
    active_deadline_s: int = 0  # 0 = none


@dataclass(frozen=True)
class TrainSpec:
    """A training run: fine-tune `base_model` on `manifest` through `stages`, writing into `output`."""

    name: str
    manifest: str
    stages: tuple[StageSpec, ...]
    base_model: str = ""  # empty = settings.model_path("trainer")
    output: str = ""  # empty = <trainer_output_dir>/<run id>
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "bf16"  # bf16 | no
    autocast_on_cpu: bool = False
    gradient_checkpointing: bool = True
    max_sequence_length: int = 256
    resume: str = "auto"  # auto (latest checkpoint in output) | never | a checkpoint folder
    log_every: int = 1
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    captions: CaptionSpec = field(default_factory=CaptionSpec)
    flow: FlowSpec = field(default_factory=FlowSpec)
    ema: EmaSpec = field(default_factory=EmaSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    sharding: ShardingSpec = field(default_factory=ShardingSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    validation: ValidationSpec = field(default_factory=ValidationSpec)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> TrainSpec:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_spec(path: str | Path) -> TrainSpec:
    """Reads a YAML (or JSON) spec file; a missing or unreadable file is an InvalidArgument on `spec`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InvalidArgument("spec", f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_spec_text(text)


def parse_spec_text(text: str) -> TrainSpec:
    """Parses YAML or JSON text into a validated TrainSpec."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument("spec", f"not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_spec(data)


def parse_spec(data: Any) -> TrainSpec:
    """Validates a decoded spec document; every error names the field (`spec.stages[1].resolution`)."""
    if not isinstance(data, dict):
        raise InvalidArgument("spec", "must be a mapping of fields")
    r = _Reader(data, "spec")
    name = r.str("name", required=True)
    if not NAME_RE.match(name):
        raise InvalidArgument("spec.name", "must be 1-30 lower-case letters, digits or '-', starting with a letter")
    manifest = r.str("manifest", required=True)
    stages_raw = r.list("stages", required=True)
    if not stages_raw:
        raise InvalidArgument("spec.stages", "needs at least one stage")
    stages = tuple(_stage(item, f"spec.stages[{i}]", i) for i, item in enumerate(stages_raw))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise InvalidArgument("spec.stages", "stage names must be unique")
    mixed = r.str("mixed_precision", default="bf16")
    if mixed not in ("bf16", "no"):
        raise InvalidArgument("spec.mixed_precision", "must be 'bf16' or 'no'")
    resume = r.str("resume", default="auto")
    spec = TrainSpec(
        name=name,
        manifest=manifest,
        stages=stages,
        base_model=r.str("base_model", default=""),
        output=r.str("output", default=""),
        seed=r.int("seed", default=0, minimum=0),
        grad_accum=r.int("grad_accum", default=1, minimum=1),
        mixed_precision=mixed,
        autocast_on_cpu=r.bool("autocast_on_cpu", default=False),
        gradient_checkpointing=r.bool("gradient_checkpointing", default=True),
        max_sequence_length=r.int("max_sequence_length", default=256, minimum=8, maximum=4096),
        resume=resume,
        log_every=r.int("log_every", default=1, minimum=1),
        optimizer=_optimizer(r.section("optimizer")),
        captions=_captions(r.section("captions")),
        flow=_flow(r.section("flow")),
        ema=_ema(r.section("ema")),
        checkpoint=_checkpoint(r.section("checkpoint")),
        resources=_resources(r.section("resources")),
        sharding=_sharding(r.section("sharding")),
        lora=_lora(r.section("lora")),
        validation=_validation(r.section("validation")),
    )
    r.done()
    _check_combinations(spec)
    return spec


def _check_combinations(spec: TrainSpec) -> None:
    """Refuses combinations the training engine does not run, naming the field to change."""
    fsdp = spec.sharding.strategy == "fsdp"
    if spec.sharding.cpu_offload and not fsdp:
        raise InvalidArgument("spec.sharding.cpu_offload", "needs strategy 'fsdp'")
    if spec.lora.enabled and fsdp:
        raise InvalidArgument(
            "spec.lora.enabled",
            "a LoRA trains with strategy 'ddp' (its weights are small): set spec.sharding.strategy to 'ddp'",
        )
    if spec.optimizer.kind == "adamw8bit" and fsdp:
        # bitsandbytes' 8-bit kernels take plain tensors, not FSDP2's DTensor shards; FSDP already splits the fp32
        # optimizer states over the ranks (8 bytes per parameter / world size).
        raise InvalidArgument("spec.optimizer.kind", "adamw8bit does not step FSDP2's sharded parameters: use adamw")


def _stage(item: Any, where: str, index: int) -> StageSpec:
    if not isinstance(item, dict):
        raise InvalidArgument(where, "must be a mapping")
    r = _Reader(item, where)
    resolution = r.int("resolution", required=True, minimum=SIDE_MULTIPLE, maximum=4096)
    bucket_step = r.int("bucket_step", default=64 if resolution >= 256 else SIDE_MULTIPLE, minimum=SIDE_MULTIPLE)
    if bucket_step % SIDE_MULTIPLE:
        raise InvalidArgument(f"{where}.bucket_step", f"must be a multiple of {SIDE_MULTIPLE}")
    if resolution % bucket_step:
        raise InvalidArgument(f"{where}.resolution", f"must be a multiple of bucket_step ({bucket_step})")
    stage = StageSpec(
        name=r.str("name", default=f"stage{index}"),
        resolution=resolution,
        steps=r.int("steps", required=True, minimum=1),
        batch_size=r.int("batch_size", default=1, minimum=1, maximum=4096),
        learning_rate=r.float("learning_rate", default=None, minimum=0.0),
        bucket_step=bucket_step,
        max_aspect=r.float("max_aspect", default=2.0, minimum=1.0, maximum=8.0),
        shift=_shift(r, "shift"),
    )
    r.done()
    return stage


def _shift(r: _Reader, key: str) -> float | str | None:
    """A flow shift: a number in [0.01, 100], "auto" (resolution-dependent) or absent."""
    value = r.data.get(key)
    if value == "auto":
        r.seen.add(key)
        return "auto"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            raise InvalidArgument(f"{r.where}.{key}", "must be a number or 'auto'") from None
    return r.float(key, default=None, minimum=0.01, maximum=100.0)


def _optimizer(r: _Reader) -> OptimizerSpec:
    spec = OptimizerSpec(
        learning_rate=r.float("learning_rate", default=1e-4, minimum=0.0),
        weight_decay=r.float("weight_decay", default=0.0, minimum=0.0),
        beta1=r.float("beta1", default=0.9, minimum=0.0, maximum=1.0),
        beta2=r.float("beta2", default=0.999, minimum=0.0, maximum=1.0),
        eps=r.float("eps", default=1e-8, minimum=0.0),
        warmup_steps=r.int("warmup_steps", default=0, minimum=0),
        max_grad_norm=r.float("max_grad_norm", default=1.0, minimum=0.0),
        kind=r.str("kind", default="adamw"),
    )
    r.done()
    if spec.kind not in OPTIMIZER_KINDS:
        raise InvalidArgument(f"{r.where}.kind", f"must be one of {', '.join(OPTIMIZER_KINDS)}")
    return spec


def _captions(r: _Reader) -> CaptionSpec:
    kinds = tuple(r.list("kinds", default=list(CAPTION_KINDS)))
    for i, kind in enumerate(kinds):
        if kind not in CAPTION_KINDS:
            raise InvalidArgument(f"{r.where}.kinds[{i}]", f"unknown caption kind {kind!r}; known: {CAPTION_KINDS}")
    spec = CaptionSpec(
        kinds=kinds,
        prompt_probability=r.float("prompt_probability", default=0.25, minimum=0.0, maximum=1.0),
        shuffle_tags=r.bool("shuffle_tags", default=True),
        tag_dropout=r.float("tag_dropout", default=0.1, minimum=0.0, maximum=1.0),
        keep_special_tags=r.bool("keep_special_tags", default=True),
        empty_probability=r.float("empty_probability", default=0.05, minimum=0.0, maximum=1.0),
    )
    r.done()
    return spec


def _flow(r: _Reader) -> FlowSpec:
    weighting = r.str("weighting", default="logit_normal")
    if weighting not in ("uniform", "logit_normal"):
        raise InvalidArgument(f"{r.where}.weighting", "must be 'uniform' or 'logit_normal'")
    spec = FlowSpec(
        shift=_shift(r, "shift"),
        weighting=weighting,
        logit_mean=r.float("logit_mean", default=0.0),
        logit_std=r.float("logit_std", default=1.0, minimum=0.01),
    )
    r.done()
    return spec


def _ema(r: _Reader) -> EmaSpec:
    spec = EmaSpec(
        enabled=r.bool("enabled", default=False),
        decay=r.float("decay", default=0.999, minimum=0.0, maximum=1.0),
        export=r.bool("export", default=True),
    )
    r.done()
    return spec


def _sharding(r: _Reader) -> ShardingSpec:
    spec = ShardingSpec(
        strategy=r.str("strategy", default="ddp"),
        reshard_after_forward=r.bool("reshard_after_forward", default=True),
        cpu_offload=r.bool("cpu_offload", default=False),
    )
    r.done()
    if spec.strategy not in SHARDING_STRATEGIES:
        raise InvalidArgument(f"{r.where}.strategy", f"must be one of {', '.join(SHARDING_STRATEGIES)}")
    return spec


def _lora(r: _Reader) -> LoraSpec:
    targets = r.list("targets", default=list(LoraSpec.targets))
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not re.match(r"^[A-Za-z0-9_.]{1,100}$", target):
            raise InvalidArgument(f"{r.where}.targets[{i}]", "must be a module name such as 'to_q' or 'to_out.0'")
    if not targets:
        raise InvalidArgument(f"{r.where}.targets", "needs at least one module name")
    spec = LoraSpec(
        enabled=r.bool("enabled", default=False),
        rank=r.int("rank", default=16, minimum=1, maximum=1024),
        alpha=r.float("alpha", default=16.0, minimum=0.0),
        dropout=r.float("dropout", default=0.0, minimum=0.0, maximum=1.0),
        targets=tuple(targets),
    )
    r.done()
    return spec


def _validation(r: _Reader) -> ValidationSpec:
    prompts = r.list("prompts", default=[])
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InvalidArgument(f"{r.where}.prompts[{i}]", "must be a string")
        check_text(prompt, f"{r.where}.prompts[{i}]", URI_MAX, multiline=False)
    seeds = r.list("seeds", default=[0])
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidArgument(f"{r.where}.seeds[{i}]", "must be an integer >= 0")
    if not seeds:
        raise InvalidArgument(f"{r.where}.seeds", "needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise InvalidArgument(f"{r.where}.seeds", "seeds must be unique (one image per prompt and seed)")
    resolution = r.int("resolution", default=0, minimum=0, maximum=4096)
    if resolution % SIDE_MULTIPLE:
        raise InvalidArgument(f"{r.where}.resolution", f"must be a multiple of {SIDE_MULTIPLE}")
    spec = ValidationSpec(
        prompts=tuple(prompts),
        seeds=tuple(seeds),
        every=r.int("every", default=0, minimum=0),
        steps=r.int("steps", default=20, minimum=1, maximum=200),
        guidance_scale=r.float("guidance_scale", default=3.5, minimum=0.0, maximum=30.0),
        resolution=resolution,
    )
    r.done()
    return spec


def _checkpoint(r: _Reader) -> CheckpointSpec:
    spec = CheckpointSpec(every=r.int("every", default=500, minimum=1), keep=r.int("keep", default=2, minimum=1))
    r.done()
    return spec


def _resources(r: _Reader) -> ResourceSpec:
    spec = ResourceSpec(
        nodes=r.int("nodes", default=1, minimum=1, maximum=1024),
        processes_per_node=r.int("processes_per_node", default=1, minimum=1, maximum=64),
        gpus_per_node=r.int("gpus_per_node", default=0, minimum=0, maximum=64),
        cpu=r.quantity("cpu", default="4"),
        memory=r.quantity("memory", default="32Gi"),
        shm_size=r.quantity("shm_size", default="8Gi"),
        checkpoint_pvc=r.dns_name("checkpoint_pvc", default="pony-checkpoints"),
        checkpoint_size=r.quantity("checkpoint_size", default="100Gi"),
        priority_class=r.dns_name("priority_class", default="pony-training"),
        image=r.str("image", default=""),
        pool=r.str("pool", default="training"),
        backoff_limit=r.int("backoff_limit", default=0, minimum=0, maximum=100),
        active_deadline_s=r.int("active_deadline_s", default=0, minimum=0),
    )
    r.done()
    return spec


class _Reader:
    """Typed field access on one mapping, remembering which keys were read so unknown keys are refused."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def _get(self, key: str, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise InvalidArgument(f"{self.where}.{key}", "is required")
            return None
        return self.data[key]

    def str(self, key: str, *, default: str = "", required: bool = False) -> str:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise InvalidArgument(f"{self.where}.{key}", "must be a string")
        check_text(value, f"{self.where}.{key}", URI_MAX, multiline=False)  # YAML escapes can spell a NUL
        if required and not value.strip():
            raise InvalidArgument(f"{self.where}.{key}", "must not be empty")
        return value

    def int(
        self,
        key: str,
        *,
        default: int = 0,
        required: bool = False,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{self.where}.{key}", "must be an integer")
        self._bounds(key, value, minimum, maximum)
        return value

    def float(
        self,
        key: str,
        *,
        default: float | None = 0.0,
        required: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> Any:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                raise InvalidArgument(f"{self.where}.{key}", "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(f"{self.where}.{key}", "must be a number")
        self._bounds(key, value, minimum, maximum)
        return float(value)

    def bool(self, key: str, *, default: bool = False) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidArgument(f"{self.where}.{key}", "must be true or false")
        return value

    def list(self, key: str, *, default: list[Any] | None = None, required: bool = False) -> list[Any]:
        value = self._get(key, required)
        if value is None:
            return list(default or [])
        if not isinstance(value, list):
            raise InvalidArgument(f"{self.where}.{key}", "must be a list")
        return value

    def quantity(self, key: str, *, default: str) -> str:
        value = self._get(key, False)
        if value is None:
            return default
        text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(text, str) or not QUANTITY_RE.match(text):
            raise InvalidArgument(f"{self.where}.{key}", "must be a Kubernetes quantity such as '8', '500m' or '16Gi'")
        return text

    def dns_name(self, key: str, *, default: str) -> str:
        value = self.str(key, default=default)
        if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", value):
            raise InvalidArgument(f"{self.where}.{key}", "must be a DNS-1123 label")
        return value

    def section(self, key: str) -> _Reader:
        value = self._get(key, False)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise InvalidArgument(f"{self.where}.{key}", "must be a mapping")
        return _Reader(value, f"{self.where}.{key}")

    def _bounds(self, key: str, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise InvalidArgument(f"{self.where}.{key}", f"must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise InvalidArgument(f"{self.where}.{key}", f"must be <= {maximum}")

    def done(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            raise InvalidArgument(f"{self.where}.{unknown[0]}", "unknown field")


def spec_json(spec: TrainSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True)


def run_output_dir(spec: TrainSpec, settings: Settings, run_id: str) -> str:
    """Where a run writes checkpoints and its final pipeline: the spec's output, else <trainer_output_dir>/<run>."""
    if spec.output:
        return spec.output
    return str(Path(runs_root(settings)) / run_id)


OUTSIDE_ROOTS = (
    "not an allowed location: name a path under the runs folder, models_dir or <state_dir>/export, or add its "
    "root to PONY_TRAINER_ROOTS"
)
OUTSIDE_RUNS = "not an allowed output: name a folder under the runs folder (PONY_TRAINER_OUTPUT_DIR) or a trainer root"


def confine_spec(spec: TrainSpec, settings: Settings, runs_roots: tuple[str, ...] = ()) -> None:
    """Raises InvalidArgument naming the first field that leaves the configured places: manifest, base_model and
    resume under the runs folder (and `runs_roots`, where the executor's runs write), models_dir, <state_dir>/export
    or PONY_TRAINER_ROOTS; output under the runs folders or PONY_TRAINER_ROOTS; resources.image from
    PONY_TRAINER_REGISTRIES (default: PONY_TRAINER_IMAGE's registry and namespace). Nothing is opened, and the
    message is the same whether or not the path exists."""
    writable = [runs_root(settings), *runs_roots, *settings.trainer.roots]
    readable = Roots([*writable, settings.models_dir, export_root(settings)])
    paths = [("spec.manifest", spec.manifest, readable, OUTSIDE_ROOTS)]
    if spec.base_model:
        paths.append(("spec.base_model", spec.base_model, readable, OUTSIDE_ROOTS))
    if spec.resume not in ("auto", "never"):
        paths.append(("spec.resume", spec.resume, readable, OUTSIDE_ROOTS))
    if spec.output:
        paths.append(("spec.output", spec.output, Roots(writable), OUTSIDE_RUNS))
    for field_name, value, roots, message in paths:
        if roots.confine(value) is None:
            raise InvalidArgument(field_name, message)
    image = spec.resources.image
    if image:
        registries = allowed_registries(settings.trainer.registries, settings.trainer.image)
        if not image_allowed(image, registries):
            raise InvalidArgument(
                "spec.resources.image",
                "not from an allowed registry: see PONY_TRAINER_REGISTRIES (default: the "
                "registry and namespace of PONY_TRAINER_IMAGE)",
            )
