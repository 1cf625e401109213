"""The training loop: AuraFlow transformer fine-tuning (full, DDP or FSDP2-sharded, or a LoRA) by rectified flow over
resolution stages and aspect buckets, with validation images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from pony_common.blobs import BlobStore
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.prompts import V7
from pony_common.prompts.budget import TokenBudget
from services.trainer.events import EventWriter
from services.trainer.spec import StageSpec, TrainSpec, run_output_dir
from services.trainer.training.buckets import Bucket, make_buckets, nearest_bucket
from services.trainer.training.captions import training_prompt
from services.trainer.training.checkpoints import (
    FINAL_DIR,
    checkpoint_dir,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    set_rng_state,
)
from services.trainer.training.ema import Ema
from services.trainer.training.flow import (
    flow_batch,
    image_seq_len,
    stage_shift,
    training_scheduler,
    transformer_timestep,
)
from services.trainer.training.latents import LatentCache, sample_latents
from services.trainer.training.lora import add_lora, save_lora
from services.trainer.training.manifest import ManifestItem, read_image_bytes, read_manifest
from services.trainer.training.optimizers import build_optimizer
from services.trainer.training.sharding import distributed, full_state_dict, full_tensor, is_fsdp, wrap
from services.trainer.training.validation import render_validation, validation_due

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    step: int
    output: Path
    final_path: Path | None
    losses: list[tuple[int, float]] = field(default_factory=list)
    latents_encoded: int = 0
    latents_reused: int = 0
    resumed_from: int = 0


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _stage_bounds(spec: TrainSpec) -> Iterator[tuple[StageSpec, int, int]]:
    start = 0
    for stage in spec.stages:
        yield stage, start, start + stage.steps
        start += stage.steps


def _image_size(item: ManifestItem, blobs: BlobStore) -> tuple[int, int]:
    if item.width > 0 and item.height > 0:
        return item.width, item.height
    with Image.open(io.BytesIO(read_image_bytes(item.image_uri, blobs))) as img:
        return img.size


class Trainer:
    """One process of a training run. `run()` trains from the latest checkpoint (or the start) to the end."""

    def __init__(
        self,
        spec: TrainSpec,
        settings: Settings,
        *,
        run_id: str,
        dist_info: DistInfo | None = None,
        events: EventWriter | None = None,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.run_id = run_id
        self.dist = dist_info or DistInfo()
        self.events = events or EventWriter(enabled=self.dist.is_main)
        self.output = Path(run_output_dir(spec, settings, run_id))
        self.blobs = BlobStore(settings.blob_url)
        if settings.device.startswith("cuda"):
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = torch.device(settings.device)
        self.fsdp = spec.sharding.strategy == "fsdp"
        # FSDP2's MixedPrecisionPolicy casts to bf16 itself; DDP/single process use autocast.
        bf16 = spec.mixed_precision == "bf16"
        self.autocast = bf16 and not self.fsdp and (self.device.type != "cpu" or spec.autocast_on_cpu)

    # --- setup ---

    def _load(self) -> None:
        if self.spec.sharding.cpu_offload and self.device.type == "cpu":
            # FSDP2's CPUOffloadPolicy moves shards to the host between uses of an accelerator; it refuses to run
            # without one, and a CPU run keeps everything in host memory anyway.
            raise InvalidArgument("spec.sharding.cpu_offload", "offloads GPU memory: this run is on CPU (PONY_DEVICE)")
        if self.fsdp and not distributed():
            raise InvalidArgument(
                "spec.sharding.strategy", "fsdp needs torch.distributed: run the entrypoint under torchrun"
            )
        base = self.spec.base_model or self.settings.model_path("trainer")
        log.info("loading base model", extra={"base_model": base, "device": str(self.device)})
        pipe = AuraFlowPipeline.from_pretrained(base, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        # The text encoder's token budget (the V7 convention, max_sequence_length): extra tags go first, never
        # the special tags, so what the sampler sends for the same tags is what training saw.
        self.budget = TokenBudget(pipe.tokenizer, V7, max_tokens=self.spec.max_sequence_length)
        bf16 = self.spec.mixed_precision == "bf16" and self.device.type == "cuda"
        frozen_dtype = torch.bfloat16 if bf16 and (self.autocast or self.fsdp) else torch.float32
        for module in (pipe.vae, pipe.text_encoder):
            module.eval().requires_grad_(False)
            if module.device != self.device or module.dtype != frozen_dtype:
                module.to(self.device, frozen_dtype)
        self.transformer = pipe.transformer.to(self.device).train().requires_grad_(True)
        if self.spec.lora.enabled:
            if self.autocast:
                # Under bf16 autocast the frozen base computes in bf16 anyway: hold it in bf16 (half the memory, as
                # diffusers' LoRA scripts do); add_lora keeps the trainable LoRA weights in fp32.
                self.transformer.to(torch.bfloat16)
            add_lora(self.transformer, self.spec.lora, seed=self.spec.seed)
        if self.spec.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        # FSDP2 shards in place: self.model is self.transformer then, its parameters DTensor shards.
        self.model: torch.nn.Module = wrap(self.transformer, self.spec, self.device)
        self.optimizer = build_optimizer(
            [p for p in self.transformer.parameters() if p.requires_grad], self.spec.optimizer
        )
        # Under FSDP the EMA shadows are DTensors too: each rank averages its own shards (no extra memory per rank
        # beyond one fp32 shard copy), they are saved with the sharded checkpoint and gathered for the export.
        self.ema = Ema(self.transformer, self.spec.ema.decay) if self.spec.ema.enabled else None
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.scheduler = training_scheduler(pipe.scheduler, self.spec.flow)
        self.cache = LatentCache(self.blobs, pipe.vae, device=self.device, max_pixels=self.settings.max_image_pixels)
        self.scaling = float(pipe.vae.config.scaling_factor)
        self.shift = float(getattr(pipe.vae.config, "shift_factor", None) or 0.0)

    def _resume(self) -> int:
        mode = self.spec.resume
        if mode == "never":
            return 0
        if mode == "auto":
            found = latest_checkpoint(self.output)
            if found is None:
                return 0
            path = found.path
        else:
            path = Path(mode)
        sharded = is_sharded(path)
        if sharded != self.fsdp:
            kind, strategy = ("a sharded (fsdp)", "fsdp") if sharded else ("an unsharded", "ddp")
            raise InvalidArgument("spec.resume", f"{path} is {kind} checkpoint: resume it with strategy {strategy}")
        if sharded:
            ema_state = self.ema.state_dict() if self.ema is not None else None
            step = load_sharded_checkpoint(
                path, model=self.model, optimizer=self.optimizer, ema_state=ema_state, rank=self.dist.rank
            )
            log.info("resumed", extra={"checkpoint": str(path), "step": step})
            return step
        ckpt = load_checkpoint(path)
        if self.spec.lora.enabled:
            result = self.transformer.load_state_dict(ckpt.model_state, strict=False)
            if result.unexpected_keys or any(n in result.missing_keys for n in self._trainable_names()):
                raise InvalidArgument("spec.resume", f"{path} does not hold this spec's LoRA weights")
        else:
            self.transformer.load_state_dict(ckpt.model_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state)
        set_rng_state(ckpt.rng)
        log.info("resumed", extra={"checkpoint": str(path), "step": ckpt.step})
        return ckpt.step

    def _barrier(self) -> None:
        if distributed():
            dist.barrier()

    def _trainable_names(self) -> list[str]:
        return [n for n, p in self.transformer.named_parameters() if p.requires_grad]

    def _model_state(self) -> dict[str, torch.Tensor]:
        """What a (non-sharded) checkpoint keeps: the whole transformer, or only the LoRA weights."""
        if self.spec.lora.enabled:
            params = dict(self.transformer.named_parameters())
            return {n: params[n].detach() for n in self._trainable_names()}
        return self.transformer.state_dict()

    # --- per step ---

    def _lr(self, stage: StageSpec, step: int) -> float:
        opt = self.spec.optimizer
        lr = stage.learning_rate if stage.learning_rate is not None else opt.learning_rate
        if opt.warmup_steps and step < opt.warmup_steps:
            lr *= (step + 1) / opt.warmup_steps
        return lr

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds = self.pipe.encode_prompt(
                prompt=prompts,
                do_classifier_free_guidance=False,
                device=self.device,
                max_sequence_length=self.spec.max_sequence_length,
            )[0]
        return embeds.float()

    def _micro_batch(
        self, by_bucket: dict[Bucket, list[ManifestItem]], stage: StageSpec, step: int, micro: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy, timestep, prompt embeds, target) for one micro-batch; randomness depends only on the step."""
        seed = _seed(self.spec.seed, step, micro, self.dist.rank)
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        buckets = sorted(by_bucket)
        bucket = rng.choices(buckets, weights=[len(by_bucket[b]) for b in buckets])[0]
        pool = by_bucket[bucket]
        if len(pool) >= stage.batch_size:
            items = rng.sample(pool, stage.batch_size)
        else:
            items = [rng.choice(pool) for _ in range(stage.batch_size)]
        prompts = [training_prompt(item, self.spec.captions, rng, self.budget) for item in items]
        x0 = torch.stack(
            [sample_latents(self.cache.get(i.image_id, bucket), gen, self.scaling, self.shift) for i in items]
        )
        fb = flow_batch(x0, self.scheduler, self.spec.flow, gen)
        embeds = self._encode_prompts(prompts)
        timestep = transformer_timestep(fb.timesteps)
        return fb.noisy.to(self.device), timestep.to(self.device), embeds, fb.target.to(self.device)

    def _train_step(self, by_bucket: dict[Bucket, list[ManifestItem]], stage: StageSpec, step: int) -> float:
        lr = self._lr(stage, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.spec.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            noisy, timestep, embeds, target = self._micro_batch(by_bucket, stage, step, micro)
            last = micro == accum - 1
            if is_fsdp(self.model):
                self.model.set_requires_gradient_sync(last)  # reduce-scatter once, after the last micro-batch
            sync = last or not isinstance(self.model, DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    pred = self.model(
                        hidden_states=noisy, encoder_hidden_states=embeds, timestep=timestep, return_dict=False
                    )[0]
                loss = F.mse_loss(pred.float(), target.float())
                (loss / accum).backward()
            total += loss.detach()
        if self.spec.optimizer.max_grad_norm > 0:
            trainable = [p for p in self.transformer.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, self.spec.optimizer.max_grad_norm)  # DTensor-aware
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.transformer)
        mean = total / accum
        if distributed():
            dist.all_reduce(mean)
            mean /= self.dist.world_size
        return float(mean.item())

    # --- stages ---

    def _stage_scheduler(self, stage: StageSpec) -> float | None:
        """The stage's flow scheduler (its shift: stage, else flow, else the base model's; "auto" by resolution)."""
        patch = int(self.transformer.config.patch_size)
        shift = stage_shift(stage, self.spec.flow, image_seq_len(stage.resolution, self.vae_scale_factor, patch))
        self.scheduler = training_scheduler(self.pipe.scheduler, self.spec.flow, shift=shift)
        return float(self.scheduler.config.shift)

    def _prepare_stage(self, stage: StageSpec, items: list[ManifestItem]) -> dict[Bucket, list[ManifestItem]]:
        shift = self._stage_scheduler(stage)
        buckets = make_buckets(stage.resolution, stage.bucket_step, stage.max_aspect)
        by_bucket: dict[Bucket, list[ManifestItem]] = {}
        pairs = []
        for i, item in enumerate(items):
            bucket = nearest_bucket(*_image_size(item, self.blobs), buckets)
            by_bucket.setdefault(bucket, []).append(item)
            if i % self.dist.world_size == self.dist.rank:
                pairs.append((item, bucket))
        encoded_before, reused_before = self.cache.encoded, self.cache.reused
        self.cache.ensure(pairs)
        self._barrier()
        self.events.emit(
            "stage",
            stage=stage.name,
            resolution=stage.resolution,
            shift=shift,
            learning_rate=stage.learning_rate if stage.learning_rate is not None else self.spec.optimizer.learning_rate,
            buckets={b.key: len(v) for b, v in sorted(by_bucket.items())},
            latents_encoded=self.cache.encoded - encoded_before,
            latents_reused=self.cache.reused - reused_before,
        )
        return by_bucket

    def _save(self, step: int) -> None:
        extra = {"run_id": self.run_id, "world_size": self.dist.world_size}
        if self.fsdp:
            path = save_sharded_checkpoint(
                self.output,
                step,
                model=self.model,
                optimizer=self.optimizer,
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                extra=extra,
                keep=self.spec.checkpoint.keep,
                rank=self.dist.rank,
            )
            self.events.emit("checkpoint", step=step, path=str(path))
            return
        if self.dist.is_main:
            path = save_checkpoint(
                self.output,
                step,
                model_state=self._model_state(),
                optimizer_state=self.optimizer.state_dict(),
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                extra=extra,
                keep=self.spec.checkpoint.keep,
            )
            self.events.emit("checkpoint", step=step, path=str(path))
        self._barrier()

    @contextlib.contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """The EMA weights in the transformer for the block (validation), the trained ones back afterwards."""
        if self.ema is None:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self.transformer.named_parameters() if n in self.ema.shadow}
        self.ema.copy_to(self.transformer)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.transformer.named_parameters():
                    if name in saved:
                        param.copy_(saved[name])

    def _validate(self, stage: StageSpec, step: int) -> None:
        """Validation images with the current weights (EMA ones when enabled): on rank 0, or on every rank under
        FSDP (the sharded forward is collective; rank 0 writes)."""
        spec = self.spec.validation
        if not (self.fsdp or self.dist.is_main):
            self._barrier()
            return
        with (
            self._ema_weights(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast),  # computes as training
        ):
            images = render_validation(
                self.pipe,
                self.model if self.fsdp else self.transformer,
                spec,
                resolution=spec.resolution or stage.resolution,
                max_sequence_length=self.spec.max_sequence_length,
                output=self.output,
                step=step,
                write=self.dist.is_main,
            )
        self.events.emit(
            "validation",
            step=step,
            stage=stage.name,
            images=[i.path for i in images],
            prompts=list(spec.prompts),
            seeds=list(spec.seeds),
        )
        if not self.fsdp:
            self._barrier()

    def _export(self) -> Path:
        """The final output: a diffusers AuraFlowPipeline (full fine-tune; under FSDP the full state dict gathered
        on rank 0) or the LoRA weights file `load_lora_weights` reads. EMA weights when ema.export."""
        final = self.output / FINAL_DIR
        use_ema = self.ema is not None and self.spec.ema.export
        if self.fsdp:
            state = full_state_dict(self.model)  # collective
            ema_full = {n: full_tensor(t) for n, t in self.ema.shadow.items()} if use_ema else {}  # collective
            if self.dist.is_main:
                state.update(ema_full)
                self._save_pipeline(final, self._unsharded_transformer(state))
            self._barrier()
            return final
        if self.dist.is_main:
            if use_ema:
                self.ema.copy_to(self.transformer)
            self.transformer.eval()
            if self.spec.gradient_checkpointing:
                self.transformer.disable_gradient_checkpointing()
            if self.spec.lora.enabled:
                save_lora(final, self.transformer)
            else:
                self._save_pipeline(final, self.transformer)
        self._barrier()
        return final

    def _unsharded_transformer(self, state: dict[str, torch.Tensor]) -> AuraFlowTransformer2DModel:
        """A plain transformer holding `state` (built on the meta device, then given the gathered tensors)."""
        with torch.device("meta"):
            transformer = AuraFlowTransformer2DModel.from_config(self.transformer.config)
        transformer.load_state_dict(state, assign=True, strict=True)
        return transformer.eval()

    def _save_pipeline(self, final: Path, transformer: torch.nn.Module) -> None:
        pipe = AuraFlowPipeline(
            tokenizer=self.pipe.tokenizer,
            text_encoder=self.pipe.text_encoder,
            vae=self.pipe.vae,
            transformer=transformer,
            scheduler=self.pipe.scheduler,
        )
        pipe.save_pretrained(final)

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Trains to the end (or until `stop_after` completed steps, leaving a checkpoint there) and exports."""
        self._load()
        start = self._resume()
        items = read_manifest(self.spec.manifest)
        total = self.spec.total_steps
        result = TrainResult(step=start, output=self.output, final_path=None, resumed_from=start)
        self.events.emit(
            "start",
            run_id=self.run_id,
            step=start,
            total_steps=total,
            world_size=self.dist.world_size,
            backend=dist.get_backend() if distributed() else "none",
            strategy=self.spec.sharding.strategy,
            lora=self.spec.lora.enabled,
            images=len(items),
            output=str(self.output),
        )
        step = start
        for stage, _, end in _stage_bounds(self.spec):
            if step >= end:
                continue
            by_bucket = self._prepare_stage(stage, items)
            while step < end:
                if stop_after is not None and step >= stop_after:
                    if not checkpoint_dir(self.output, step).exists():
                        self._save(step)
                    result.step = step
                    return self._finish(result)
                loss = self._train_step(by_bucket, stage, step)
                step += 1
                result.losses.append((step, loss))
                if step % self.spec.log_every == 0 or step == total:
                    self.events.emit("step", step=step, loss=loss, lr=self._lr(stage, step - 1), stage=stage.name)
                if validation_due(self.spec.validation, step, end):
                    self._validate(stage, step)
                if step % self.spec.checkpoint.every == 0 or step == total:
                    self._save(step)
        result.step = step
        result.final_path = self._export()
        self._finish(result)
        self.events.emit(
            "done",
            step=step,
            output=str(result.final_path),
            loss=result.losses[-1][1] if result.losses else None,
            latents_encoded=result.latents_encoded,
            latents_reused=result.latents_reused,
        )
        return result

    def _finish(self, result: TrainResult) -> TrainResult:
        result.latents_encoded = self.cache.encoded
        result.latents_reused = self.cache.reused
        return result


def run_training(
    spec: TrainSpec,
    settings: Settings,
    *,
    run_id: str,
    dist_info: DistInfo | None = None,
    events: EventWriter | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Runs one process of a training run (see Trainer)."""
    return Trainer(spec, settings, run_id=run_id, dist_info=dist_info, events=events).run(stop_after=stop_after)
