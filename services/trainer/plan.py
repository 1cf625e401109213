"""The memory plan of a training run: GPU (and host) bytes per rank for a spec and world size, computed from the
transformer config instantiated on the meta device. An estimate of what the training pod will hold, not a measurement.

Every number comes from the model config (parameters are counted on `torch.device("meta")`, nothing is allocated)
and from the spec. Per rank, with P = transformer parameters, T = trainable parameters (P for a full fine-tune,
the LoRA matrices when `lora.enabled`), N = world size, c = compute bytes (2 for `mixed_precision: bf16`, 4 else):

- weights: full fine-tune, DDP: fp32 params 4P (they are the master copy) plus the bf16 copies autocast caches
  while a step runs, 2P; FSDP2 (`fully_shard`, MixedPrecisionPolicy param bf16 / reduce fp32): fp32 master
  shards 4P/N, plus the unsharded working set (below). LoRA: the frozen base as the loop keeps it (fp32 today:
  4P, /N under FSDP; see `placement`), and the LoRA matrices in fp32, 4T (/N).
- gradients: fp32, 4T (/N under FSDP). DDP with more than one rank also keeps its reducer buckets, another 4T
  (`gradient_as_bucket_view=False`, the default the training loop uses).
- optimizer states: AdamW exp_avg + exp_avg_sq in fp32, 8T; `adamw8bit` (bitsandbytes AdamW8bit, blockwise) two
  uint8 states plus one fp32 absmax per 256-value block each, 2 + 8/256 bytes per trainable (/N); bitsandbytes
  keeps fp32 states for tensors under 4096 values (biases, norms: not modelled, well under 0.1% here).
- EMA: an fp32 copy of the trainable parameters, 4T (/N: the EMA of the local shards under FSDP).
- `sharding.cpu_offload`: the sharded master params, gradients, optimizer states and EMA live in host memory
  (FSDP2 CPUOffloadPolicy); they show in the host column and leave the GPU.
- FSDP working set: a block's parameters gathered in the compute dtype while it runs and the next one prefetched
  (FSDP2 implicit prefetch: 2 blocks), the root's own parameters (embedders, final layer: never resharded), and
  in backward the block's unsharded gradients before reduce-scatter (c bytes, plus their fp32 copy for the fp32
  reduce under bf16). With `reshard_after_forward: false` every block stays gathered: cP.
- activations: measured, not guessed: the real diffusers blocks run forward on the meta device at the stage's
  token count while `saved_tensors_hooks` records every tensor autograd keeps for backward (unique storages,
  parameters excluded; attention as the fused flash kernel saves it: q, k, v, output, log-sum-exp). Tokens:
  (H/16)*(W/16) image tokens (VAE /8, then 2x2 patches; a bucket of about `resolution`^2 pixels is taken as
  square) + `max_sequence_length` text tokens + 8 register tokens; linear in `batch_size` per process. Without
  gradient checkpointing every block's saved tensors stay until backward, plus one block's worth of activation
  gradients in flight; with it only each block's inputs stay, plus one block recomputed and its gradients (2
  blocks' worth). The stage with the largest activations decides.
- frozen text encoder (UMT5) and VAE on the GPU, bf16 on the autocast path and fp32 under FSDP as the loop places
  them (it encodes prompts per step and latents on a cache miss); their no-grad working memory and
  validation-image generation run outside the training step and are not counted.
- constants: CUDA context, cuBLAS/cuDNN workspaces and loaded kernels (`CUDA_CONTEXT_BYTES`), NCCL buffers when
  N > 1 (`NCCL_BYTES`). The allocator's cache and fragmentation are covered by `PONY_TRAINER_GPU_MEMORY_HEADROOM`
  (a fraction of `PONY_TRAINER_GPU_MEMORY_GIB` kept free), not by this plan.

Known gaps: under DDP + autocast the residual stream between blocks is fp32 (fp32 pos_embed), so checkpointed
block inputs may be up to twice the bf16 figure; attention implementations other than flash/efficient keep more;
peak transients of the optimizer step (a foreach AdamW's temporaries) are not modelled.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pony_common.config import ConfigError
from pony_common.errors import InvalidArgument
from services.trainer.spec import LoraSpec, TrainSpec

GIB = 1024**3
# AdamW: exp_avg and exp_avg_sq in fp32. 8-bit (bitsandbytes blockwise): two uint8 states, an fp32 absmax per 256.
ADAMW_STATE_BYTES = 8.0
ADAMW8BIT_STATE_BYTES = 2.0 + 2 * 4 / 256
FP32 = 4
# CUDA context + cuBLAS/cuDNN workspaces + lazily loaded kernels on an H100/H200 class GPU (about 0.5-1 GiB seen).
CUDA_CONTEXT_BYTES = 1 * GIB
# NCCL communicators' buffers (ring/tree channels, all-gather/reduce-scatter staging) when N > 1.
NCCL_BYTES = 1 * GIB
# FSDP2 implicit prefetch: the block computing and the next one gathered.
FSDP_GATHERED_BLOCKS = 2
# Activation gradients in flight while one block back-propagates, in units of that block's saved activations.
BACKWARD_TRANSIENT_BLOCKS = 1
# AuraFlow prepends 8 learned register tokens to the text tokens.
REGISTER_TOKENS = 8
# The VAE downsamples 8x; the transformer then patches 2x2 latents (`patch_size`): 16 px per image token side.
VAE_DOWNSAMPLE = 8

# The real V7 / AuraFlow 0.3 configs (the full size of pony_common/models/auraflow.py and the diffusers anchor
# benchmark), used when the base model's own config.json cannot be read (e.g. a path inside the training pod).
V7_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "patch_size": 2,
    "in_channels": 4,
    "num_mmdit_layers": 4,
    "num_single_dit_layers": 32,
    "attention_head_dim": 256,
    "num_attention_heads": 12,
    "joint_attention_dim": 2048,
    "caption_projection_dim": 3072,
    "out_channels": 4,
    "pos_embed_max_size": 9216,
}
V7_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 2048,
    "d_kv": 64,
    "d_ff": 5120,
    "num_layers": 24,
    "num_heads": 32,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "scalable_attention": True,
}
V7_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
}
BUILT_IN = "built-in V7 config (AuraFlow 0.3)"

# diffusers' from_config and peft's injection are not made for concurrent use; the meta work is short.
_meta_lock = threading.Lock()


@dataclass(frozen=True)
class ModelConfigs:
    """The configs the plan instantiates, and where they came from."""

    transformer: dict[str, Any]
    text_encoder: dict[str, Any]
    vae: dict[str, Any]
    source: str


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of the meta-device transformer (and the frozen parts)."""

    total: int  # transformer, without LoRA matrices
    trainable: int  # = total for a full fine-tune; the LoRA matrices with LoRA
    lora: int  # LoRA matrices (0 without LoRA): rank * (in + out) per targeted Linear
    blocks: int  # transformer blocks (joint + single)
    largest_block: int
    root: int  # parameters outside the blocks (embedders, register tokens, final layer)
    text_encoder: int
    vae: int


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps for one sample at one token count, from a meta-device forward."""

    outside_blocks: int  # saved tensors outside the blocks (embedders, final layer)
    per_block: tuple[int, ...]  # saved tensors of each block
    block_inputs: tuple[int, ...]  # what each block takes in (all a checkpointed block keeps)

    def bytes(self, batch: int, checkpointing: bool) -> int:
        peak_block = max(self.per_block, default=0)
        if checkpointing:
            kept = sum(self.block_inputs) + (1 + BACKWARD_TRANSIENT_BLOCKS) * peak_block
        else:
            kept = sum(self.per_block) + BACKWARD_TRANSIENT_BLOCKS * peak_block
        return batch * (self.outside_blocks + kept)


@dataclass(frozen=True)
class Term:
    """One row of the plan: bytes on the GPU and in host memory per rank."""

    name: str
    gpu: int
    host: int = 0
    note: str = ""
    counted: bool = True  # False: a stage's activations that another stage exceeds


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank memory of a spec on `world_size` ranks; `gpu_bytes` is what must fit one GPU."""

    spec_name: str
    world_size: int
    strategy: str
    counts: ParamCounts
    source: str
    terms: tuple[Term, ...]
    deciding_stage: int  # index of the stage with the largest activations

    @property
    def gpu_bytes(self) -> int:
        return sum(t.gpu for t in self.terms if t.counted)

    @property
    def host_bytes(self) -> int:
        return sum(t.host for t in self.terms if t.counted)

    @property
    def activation_bytes(self) -> int:
        return sum(t.gpu for t in self.terms if t.counted and t.name.startswith("activations"))

    def table(self) -> str:
        """The terms as a fixed-width table (GiB), the total last."""
        c = self.counts
        layout = f"{self.strategy} on {self.world_size} GPU{'s' if self.world_size > 1 else ''}"
        mode = f"LoRA, {c.trainable:,} trainable" if c.lora else f"full fine-tune, {c.trainable:,} trainable"
        lines = [
            f"memory plan for {self.spec_name}: {layout}, per rank",
            f"transformer {c.total:,} params ({c.total / 1e9:.3f}B; {mode}); largest block {c.largest_block:,};"
            f" text encoder {c.text_encoder:,}; VAE {c.vae:,}; config: {self.source}",
            f"{'term':<44} {'GPU GiB':>9} {'host GiB':>9}  how",
        ]
        for t in self.terms:
            gpu = f"{t.gpu / GIB:.2f}" if t.counted else f"({t.gpu / GIB:.2f})"
            host = f"{t.host / GIB:.2f}" if t.host else ""
            note = t.note if t.counted else f"{t.note}; not counted: a larger stage decides"
            lines.append(f"{t.name:<44} {gpu:>9} {host:>9}  {note}")
        lines.append(f"{'total per rank':<44} {self.gpu_bytes / GIB:9.2f} {self.host_bytes / GIB:9.2f}")
        return "\n".join(lines)


def read_configs(base_model: str) -> ModelConfigs:
    """The base model's transformer/text_encoder/vae config.json when its transformer config is readable here,
    else the built-in V7 configs. A config.json that exists but is not a JSON object is an InvalidArgument."""
    folder = Path(base_model) if base_model and "://" not in base_model else None
    if folder is None or not (folder / "transformer" / "config.json").is_file():
        return ModelConfigs(V7_TRANSFORMER_CONFIG, V7_TEXT_ENCODER_CONFIG, V7_VAE_CONFIG, BUILT_IN)
    transformer = _read_json(folder / "transformer" / "config.json")
    text_encoder = V7_TEXT_ENCODER_CONFIG
    if (folder / "text_encoder" / "config.json").is_file():
        text_encoder = _read_json(folder / "text_encoder" / "config.json")
    vae = V7_VAE_CONFIG
    if (folder / "vae" / "config.json").is_file():
        vae = _read_json(folder / "vae" / "config.json")
    return ModelConfigs(transformer, text_encoder, vae, str(folder))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument("spec.base_model", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("spec.base_model", f"{path} is not a JSON object")
    return data


def _key(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)


def meta_transformer(config: dict[str, Any], lora: LoraSpec | None = None) -> torch.nn.Module:
    """`AuraFlowTransformer2DModel.from_config(config)` on the meta device (no memory), with the spec's LoRA
    adapter added by peft when `lora` is given."""
    from diffusers import AuraFlowTransformer2DModel

    with _meta_lock, torch.device("meta"):
        try:
            model = AuraFlowTransformer2DModel.from_config(config)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("spec.base_model", f"transformer config not usable: {exc}") from None
        if lora is not None:
            from peft import LoraConfig

            model.add_adapter(
                LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets), lora_dropout=0.0)
            )
    return model


def lora_targets(model: torch.nn.Module, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers a peft LoraConfig with `target_modules=targets` adapts: the module's name is a target or
    ends with "." + a target."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            found.append((name, module))
    return found


def lora_param_count(model: torch.nn.Module, lora: LoraSpec) -> int:
    """LoRA matrices A (rank x in) and B (out x rank) per targeted Linear: rank * (in + out) each."""
    return sum(lora.rank * (m.in_features + m.out_features) for _, m in lora_targets(model, lora.targets))


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [*model.joint_transformer_blocks, *model.single_transformer_blocks]


@lru_cache(maxsize=16)
def _counts(transformer_key: str, text_encoder_key: str, vae_key: str, lora: LoraSpec | None) -> ParamCounts:
    model = meta_transformer(json.loads(transformer_key))
    total = sum(p.numel() for p in model.parameters())
    block_sizes = [sum(p.numel() for p in b.parameters()) for b in _blocks(model)]
    lora_count = lora_param_count(model, lora) if lora is not None else 0
    return ParamCounts(
        total=total,
        trainable=lora_count if lora is not None else total,
        lora=lora_count,
        blocks=sum(block_sizes),
        largest_block=max(block_sizes, default=0),
        root=total - sum(block_sizes),
        text_encoder=_frozen_count("text_encoder", text_encoder_key),
        vae=_frozen_count("vae", vae_key),
    )


def _frozen_count(kind: str, key: str) -> int:
    config = json.loads(key)
    with _meta_lock, torch.device("meta"):
        try:
            if kind == "text_encoder":
                from transformers import UMT5Config, UMT5EncoderModel

                model: torch.nn.Module = UMT5EncoderModel(UMT5Config(**config))
            else:
                from diffusers import AutoencoderKL

                model = AutoencoderKL.from_config(config)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("spec.base_model", f"{kind} config not usable: {exc}") from None
    return sum(p.numel() for p in model.parameters())


def param_counts(configs: ModelConfigs, lora: LoraSpec | None = None) -> ParamCounts:
    """Exact counts from the configs on the meta device; `lora` (enabled) makes only its matrices trainable."""
    return _counts(_key(configs.transformer), _key(configs.text_encoder), _key(configs.vae), lora)


class _FlashAttention(TorchFunctionMode):
    """Runs `F.scaled_dot_product_attention` as the fused flash kernel (what a GPU runs and what it saves for
    backward); on the meta device the default would pick the math path, which keeps the full attention matrix.
    A TorchFunctionMode is per thread: nothing else in the process is affected."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) == 3:
            q, k, v = args
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


@lru_cache(maxsize=32)
def _profile(transformer_key: str, lora: LoraSpec | None, side: int, text_tokens: int, dtype: str) -> ActivationProfile:
    config = json.loads(transformer_key)
    # nn.Module.to: ModelMixin.to warns about fp32-kept modules, which AuraFlow has none of.
    model = torch.nn.Module.to(meta_transformer(config, lora), getattr(torch, dtype))
    if lora is None:
        model.requires_grad_(True)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, tuple[int | None, int]] = {}
    inputs: dict[int, int] = {}
    current: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params and storage._cdata not in saved:
            saved[storage._cdata] = (current[0], storage.nbytes())
        return t

    def enter(index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            current[0] = index
            found = [x for x in [*args, *kwargs.values()] if isinstance(x, torch.Tensor)]
            inputs[index] = sum({x.untyped_storage()._cdata: x.untyped_storage().nbytes() for x in found}.values())

        return hook

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        current[0] = None

    blocks = _blocks(model)
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    dt = getattr(torch, dtype)
    latent_side = side // VAE_DOWNSAMPLE
    latents = torch.empty(1, config.get("in_channels", 4), latent_side, latent_side, device="meta", dtype=dt)
    text = torch.empty(1, text_tokens, config.get("joint_attention_dim", 2048), device="meta", dtype=dt)
    timestep = torch.empty(1, device="meta", dtype=dt)
    try:
        with _FlashAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(latents, encoder_hidden_states=text, timestep=timestep).sample
        del out
    finally:
        for handle in handles:
            handle.remove()
    per_block = [0] * len(blocks)
    outside = 0
    for index, nbytes in saved.values():
        if index is None:
            outside += nbytes
        else:
            per_block[index] += nbytes
    return ActivationProfile(outside, tuple(per_block), tuple(inputs.get(i, 0) for i in range(len(blocks))))


def activation_profile(
    configs: ModelConfigs, resolution: int, max_sequence_length: int, compute_dtype: torch.dtype, lora: LoraSpec | None
) -> ActivationProfile:
    """Saved-for-backward bytes of one sample at `resolution`^2 pixels and `max_sequence_length` text tokens."""
    return _profile(_key(configs.transformer), lora, resolution, max_sequence_length, str(compute_dtype).split(".")[1])


def world_size(spec: TrainSpec) -> int:
    """Ranks of a run: nodes x processes per node."""
    return spec.resources.nodes * spec.resources.processes_per_node


def _check_resolution(spec: TrainSpec, config: dict[str, Any]) -> None:
    patch = int(config.get("patch_size", 2))
    max_positions = int(config.get("pos_embed_max_size", 1024))
    max_side = math.isqrt(max_positions) * patch * VAE_DOWNSAMPLE
    for i, stage in enumerate(spec.stages):
        if stage.resolution > max_side:
            raise InvalidArgument(
                f"spec.stages[{i}].resolution",
                f"{stage.resolution} px is more than the transformer's position table covers "
                f"(pos_embed_max_size {max_positions}: {max_side} px square)",
            )


@dataclass(frozen=True)
class Placement:
    """Bytes per value of what the training loop keeps in which dtype."""

    compute: int  # weights as the matmuls see them, and activations: 2 (bf16) or 4
    frozen: int  # text encoder and VAE
    lora_base: int  # the frozen transformer under a LoRA


def placement(spec: TrainSpec) -> Placement:
    """The dtypes services/trainer/training/loop.py (`Trainer._load`) and sharding.py use on a GPU, mirrored here
    (the controller may not import the training code; change both together): under `mixed_precision: bf16`, bf16
    compute (FSDP2 MixedPrecisionPolicy, else autocast), the frozen text encoder and VAE held in bf16, and a LoRA's
    frozen base held in bf16 (autocast path; the LoRA weights stay fp32); fp32 everywhere otherwise."""
    bf16 = spec.mixed_precision == "bf16"
    autocast = bf16 and spec.sharding.strategy != "fsdp"
    return Placement(compute=2 if bf16 else FP32, frozen=2 if bf16 else FP32, lora_base=2 if autocast else FP32)


def _name(nbytes: int) -> str:
    return "bf16" if nbytes == 2 else "fp32"


def plan_memory(spec: TrainSpec, world: int | None = None, base_model: str = "") -> MemoryPlan:
    """The per-rank plan of `spec` on `world` ranks (default: nodes x processes_per_node), from the configs of
    `base_model` (default: spec.base_model) when readable, else the built-in V7 configs."""
    world = world or world_size(spec)
    if world < 1:
        raise InvalidArgument("gpus", "must be at least 1")
    configs = read_configs(base_model or spec.base_model)
    _check_resolution(spec, configs.transformer)
    lora = spec.lora if spec.lora.enabled else None
    counts = param_counts(configs, lora)
    bf16 = spec.mixed_precision == "bf16"
    place = placement(spec)
    c = place.compute
    fsdp = spec.sharding.strategy == "fsdp"
    shard = world if fsdp else 1
    offload = fsdp and spec.sharding.cpu_offload
    p, t = counts.total, counts.trainable
    opt = ADAMW8BIT_STATE_BYTES if spec.optimizer.kind == "adamw8bit" else ADAMW_STATE_BYTES
    terms: list[Term] = []

    def state(name: str, nbytes: float, note: str) -> None:
        nbytes = int(nbytes / shard)
        sharded = f", /{shard} sharded" if fsdp else (", replicated" if world > 1 else "")
        if offload:
            terms.append(Term(name, 0, nbytes, note + sharded + ", offloaded to host"))
        else:
            terms.append(Term(name, nbytes, 0, note + sharded))

    dtype_name = "bf16" if bf16 else "fp32"
    if lora is None:
        state("master params (fp32)", FP32 * p, "4 B x params")
        if not fsdp and bf16:
            terms.append(Term("bf16 weight copies (autocast cache)", 2 * p, 0, "2 B x params while a step runs"))
    else:
        state(f"frozen base params ({_name(place.lora_base)})", place.lora_base * p, f"{place.lora_base} B x params")
        state("LoRA params (fp32)", FP32 * t, "4 B x LoRA params")
    if fsdp:
        if spec.sharding.reshard_after_forward:
            gathered = c * (FSDP_GATHERED_BLOCKS * counts.largest_block + counts.root)
            how = f"{FSDP_GATHERED_BLOCKS} largest blocks + root params, {c} B each"
        else:
            gathered = c * p
            how = f"reshard_after_forward false: all params, {c} B each"
        terms.append(Term(f"FSDP gathered params ({dtype_name})", gathered, 0, how))
        if lora is None:
            grad_bytes = (c + FP32) if bf16 else FP32
            terms.append(
                Term(
                    "FSDP unsharded block grads",
                    grad_bytes * counts.largest_block,
                    0,
                    f"largest block before reduce-scatter, {grad_bytes} B each",
                )
            )
    state("gradients (fp32)", FP32 * t, "4 B x trainable")
    if not fsdp and world > 1:
        terms.append(Term("DDP reducer buckets (fp32)", FP32 * t, 0, "4 B x trainable"))
    state(f"optimizer states ({spec.optimizer.kind})", opt * t, f"{opt:g} B x trainable")
    if spec.ema.enabled:
        state("EMA (fp32)", FP32 * t, "4 B x trainable")
    f = place.frozen
    terms.append(Term(f"text encoder, frozen ({_name(f)})", f * counts.text_encoder, 0, f"{f} B x params"))
    terms.append(Term(f"VAE, frozen ({_name(f)})", f * counts.vae, 0, f"{f} B x params"))

    compute = torch.bfloat16 if bf16 else torch.float32
    ckpt = spec.gradient_checkpointing
    side_px = VAE_DOWNSAMPLE * int(configs.transformer.get("patch_size", 2))
    stage_bytes = []
    for stage in spec.stages:
        profile = activation_profile(
            configs, stage.resolution, spec.max_sequence_length + REGISTER_TOKENS, compute, lora
        )
        stage_bytes.append(profile.bytes(stage.batch_size, ckpt))
    deciding = max(range(len(stage_bytes)), key=stage_bytes.__getitem__)
    for i, stage in enumerate(spec.stages):
        tokens = (stage.resolution // side_px) ** 2 + spec.max_sequence_length + REGISTER_TOKENS
        how = f"{tokens} tokens x batch {stage.batch_size}, {'checkpointed' if ckpt else 'no checkpointing'}"
        terms.append(
            Term(f"activations {stage.name} ({stage.resolution}px)", stage_bytes[i], 0, how, counted=i == deciding)
        )
    terms.append(Term("CUDA context + workspaces", CUDA_CONTEXT_BYTES, 0, "constant"))
    if world > 1:
        terms.append(Term("NCCL buffers", NCCL_BYTES, 0, "constant, N > 1"))
    return MemoryPlan(spec.name, world, spec.sharding.strategy, counts, configs.source, tuple(terms), deciding)


def usable_bytes(gpu_memory_gib: float, headroom: float) -> int:
    """What the plan may use of one GPU: its memory less the headroom fraction."""
    if not gpu_memory_gib > 0:
        raise ConfigError(f"PONY_TRAINER_GPU_MEMORY_GIB={gpu_memory_gib:g}: must be more than 0")
    if not 0 <= headroom < 1:
        raise ConfigError(f"PONY_TRAINER_GPU_MEMORY_HEADROOM={headroom:g}: must be in [0, 1)")
    return int(gpu_memory_gib * GIB * (1.0 - headroom))


def refusal(plan: MemoryPlan, spec: TrainSpec, gpu_memory_gib: float, headroom: float) -> InvalidArgument | None:
    """None when the plan fits one GPU of `gpu_memory_gib` GiB less `headroom`; else the InvalidArgument that
    names the field to change first and gives the figures."""
    available = usable_bytes(gpu_memory_gib, headroom)
    need = plan.gpu_bytes
    if need <= available:
        return None
    figures = (
        f"needs {need / GIB:.1f} GiB per GPU, {available / GIB:.1f} GiB usable "
        f"({gpu_memory_gib:g} GiB less {headroom:.0%} headroom) on {plan.world_size} GPU(s)"
    )
    fixed = need - plan.activation_bytes
    i = plan.deciding_stage
    if fixed > available:
        alone = f"{fixed / GIB:.1f} GiB before activations"
        if spec.lora.enabled:
            field, fix = "spec.resources.pool", f"the frozen model alone needs {alone}: a pool with larger GPUs"
        elif spec.sharding.strategy == "ddp":
            field, fix = "spec.sharding.strategy", "use 'fsdp' over enough GPUs to shard params, grads and optimizer"
        elif not spec.sharding.cpu_offload:
            field, fix = "spec.sharding.cpu_offload", "offload the sharded state to host memory, or add GPUs"
        else:
            field, fix = "spec.resources.nodes", f"add GPUs ({alone})"
    elif not spec.gradient_checkpointing:
        field, fix = "spec.gradient_checkpointing", "turn it on to keep only block inputs"
    elif spec.stages[i].batch_size > 1:
        field, fix = f"spec.stages[{i}].batch_size", "lower it (and raise grad_accum)"
    else:
        field, fix = f"spec.stages[{i}].resolution", "lower it"
    return InvalidArgument(field, f"the run does not fit the training pool's GPUs: the memory plan {figures}; {fix}")
