"""The training loop: AuraFlow transformer fine-tuning by rectified flow over resolution stages and aspect buckets."""

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
from diffusers import AuraFlowPipeline
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from pony_common.blobs import BlobStore
from pony_common.config import Settings
from services.trainer.events import EventWriter
from services.trainer.spec import StageSpec, TrainSpec, run_output_dir
from services.trainer.training.buckets import Bucket, make_buckets, nearest_bucket
from services.trainer.training.captions import training_prompt
from services.trainer.training.checkpoints import (
    FINAL_DIR,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from services.trainer.training.ema import Ema
from services.trainer.training.flow import flow_batch, training_scheduler, transformer_timestep
from services.trainer.training.latents import LatentCache, sample_latents
from services.trainer.training.manifest import ManifestItem, read_image_bytes, read_manifest

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
        self.autocast = spec.mixed_precision == "bf16" and (self.device.type != "cpu" or spec.autocast_on_cpu)

    # --- setup ---

    def _load(self) -> None:
        base = self.spec.base_model or self.settings.model_path("trainer")
        log.info("loading base model", extra={"base_model": base, "device": str(self.device)})
        pipe = AuraFlowPipeline.from_pretrained(base, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        frozen_dtype = torch.bfloat16 if self.autocast and self.device.type == "cuda" else torch.float32
        for module in (pipe.vae, pipe.text_encoder):
            module.eval().requires_grad_(False)
            if module.device != self.device or module.dtype != frozen_dtype:
                module.to(self.device, frozen_dtype)
        self.transformer = pipe.transformer.to(self.device).train().requires_grad_(True)
        if self.spec.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.model: torch.nn.Module = self.transformer
        if dist.is_available() and dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.transformer, device_ids=ids)
        opt = self.spec.optimizer
        self.optimizer = torch.optim.AdamW(
            [p for p in self.transformer.parameters() if p.requires_grad],
            lr=opt.learning_rate,
            betas=(opt.beta1, opt.beta2),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        self.ema = Ema(self.transformer, self.spec.ema.decay) if self.spec.ema.enabled else None
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
        ckpt = load_checkpoint(path)
        self.transformer.load_state_dict(ckpt.model_state)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        if self.ema is not None and ckpt.ema_state is not None:
            self.ema.load_state_dict(ckpt.ema_state)
        set_rng_state(ckpt.rng)
        log.info("resumed", extra={"checkpoint": str(path), "step": ckpt.step})
        return ckpt.step

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

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
        prompts = [training_prompt(item, self.spec.captions, rng) for item in items]
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
            sync = micro == accum - 1 or not isinstance(self.model, DistributedDataParallel)
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
            torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), self.spec.optimizer.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.transformer)
        mean = total / accum
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= self.dist.world_size
        return float(mean.item())

    # --- stages ---

    def _prepare_stage(self, stage: StageSpec, items: list[ManifestItem]) -> dict[Bucket, list[ManifestItem]]:
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
            buckets={b.key: len(v) for b, v in sorted(by_bucket.items())},
            latents_encoded=self.cache.encoded - encoded_before,
            latents_reused=self.cache.reused - reused_before,
        )
        return by_bucket

    def _save(self, step: int) -> None:
        if self.dist.is_main:
            path = save_checkpoint(
                self.output,
                step,
                model_state=self.transformer.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                ema_state=self.ema.state_dict() if self.ema is not None else None,
                extra={"run_id": self.run_id, "world_size": self.dist.world_size},
                keep=self.spec.checkpoint.keep,
            )
            self.events.emit("checkpoint", step=step, path=str(path))
        self._barrier()

    def _export(self) -> Path:
        final = self.output / FINAL_DIR
        if self.dist.is_main:
            if self.ema is not None and self.spec.ema.export:
                self.ema.copy_to(self.transformer)
            self.transformer.eval()
            if self.spec.gradient_checkpointing:
                self.transformer.disable_gradient_checkpointing()
            pipe = AuraFlowPipeline(
                tokenizer=self.pipe.tokenizer,
                text_encoder=self.pipe.text_encoder,
                vae=self.pipe.vae,
                transformer=self.transformer,
                scheduler=self.pipe.scheduler,
            )
            pipe.save_pretrained(final)
        self._barrier()
        return final

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
            backend=dist.get_backend() if dist.is_available() and dist.is_initialized() else "none",
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
