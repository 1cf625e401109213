"""The Triton Python-backend model of every model family: the config's `family` parameter picks the diffusers
pipeline (`pony_v7`: AuraFlowPipeline, `pony_v6`: StableDiffusionXLPipeline) and how it is called; one file serves
both, each family a Triton model of its own name behind Triton's dynamic batcher.

Decoupled: every request gets progress responses (step i of n, optionally a small latent preview) and then exactly
one final response with its images, or one final error. Requests that share width, height, steps, guidance and LoRA
set (the optional ADAPTERS input, services/sampler/lora.py) run as one pipeline batch (one seeded generator per
image, so each image equals its unbatched run up to float rounding); a cancelled request stops receiving work
between steps; a failure answers the requests of its own batch with an error and never the other batches. The
pipeline loads in `initialize()`, never at import.
This file is copied into every version folder of every family (`<repo>/<family>/<N>/model.py`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# A version folder may name its own weights here ({"uri": "/path/to/pipeline"}); else `pipeline_path`.
VERSION_FILE = "pipeline.json"
# Families and their pipeline loaders (pony_common.models.<module>.load_pipeline).
PIPELINE_MODULES = {"pony_v7": "pony_common.models.auraflow", "pony_v6": "pony_common.models.sdxl"}


class _AllCancelled(Exception):
    """Every request of the running batch was cancelled: stop the pipeline."""


@dataclass
class _Job:
    """One request: its parsed inputs and where its responses go."""

    request: Any
    sender: Any
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    preview: bool
    done: bool = False
    model: str = ""  # the family (Triton model name), for log lines
    adapters: tuple[Any, ...] = ()  # services.sampler.lora.AdapterSpec, from the optional ADAPTERS input

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests run in one pipeline batch only when this is equal (the LoRA set included)."""
        from services.sampler.lora import batch_key

        return (self.width, self.height, self.steps, self.guidance, batch_key(self.adapters))

    def cancel(self, step: int) -> None:  # step: steps done before the cancel was seen
        """Answers a request the client cancelled (the client no longer listens; Triton needs the final flag)."""
        if self.done:
            return
        rid = self.request.request_id()
        pb_utils.Logger.log_info(f"{self.model} request {rid} cancelled after step {step} of {self.steps}")
        self.fail("cancelled", pb_utils.TritonError.CANCELLED)

    def fail(self, message: str, code: Any = None) -> None:
        if self.done:
            return
        self.done = True
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        self.sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _extend_sys_path() -> None:
    """The stub runs an isolated interpreter: add PYTHONPATH's entries (repo root, site-packages) it lacks."""
    import site

    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            site.addsitedir(entry)


def _scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"{name}: missing input")
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value.item()


class TritonPythonModel:
    """The pipeline, its limits, and the batch loop."""

    def initialize(self, args: dict[str, Any]) -> None:
        _extend_sys_path()
        from services.sampler.fastpath import utf8_locale

        utf8_locale()  # the stub's C locale breaks torch.compile: UTF-8 before diffusers (and inductor) import
        import importlib

        import torch

        self.torch = torch
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.family = params.get("family", "") or args.get("model_name", "pony_v7")
        if self.family not in PIPELINE_MODULES:
            raise pb_utils.TritonModelException(f"unknown family {self.family!r}; known: {', '.join(PIPELINE_MODULES)}")
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{self.family} must be decoupled (model_transaction_policy.decoupled)")
        load_pipeline = importlib.import_module(PIPELINE_MODULES[self.family]).load_pipeline
        self.version = int(args["model_version"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        pipeline_path = params.get("pipeline_path", "")
        if (version_dir / VERSION_FILE).exists():
            pipeline_path = json.loads((version_dir / VERSION_FILE).read_text())["uri"]
        device = params.get("device", "cpu") or "cpu"
        if device == "cuda" and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        dtype = getattr(torch, params.get("dtype", "float32") or "float32")
        threads = int(params.get("torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.max_width = int(params.get("max_width", "1536"))
        self.max_height = int(params.get("max_height", "1536"))
        self.max_steps = int(params.get("max_steps", "100"))
        self.max_images = int(params.get("max_images", "4"))
        self.max_batch_images = max(1, int(params.get("max_batch_images", "8")))

        if params.get("random_init", "") == "full" and self.family == "pony_v7":
            # Benchmarks: the full-size architecture with random weights, built on the device in `dtype`.
            from diffusers import AuraFlowPipeline
            from transformers import AutoTokenizer

            from pony_common.models.auraflow import build_auraflow_components

            tokenizer = AutoTokenizer.from_pretrained(str(Path(pipeline_path) / "tokenizer"))
            components = build_auraflow_components(tokenizer, size="full", device=device, dtype=dtype)
            self.pipe = AuraFlowPipeline(**components)
            self.pipe.set_progress_bar_config(disable=True)
        else:
            if params.get("random_init", "") == "full":
                pb_utils.Logger.log_warn(f"{self.family}: random_init=full is V7 only; loading {pipeline_path}")
            self.pipe = load_pipeline(pipeline_path, device, dtype)
        self.device = device
        from services.sampler.lora import AdapterCache

        # LoRA adapters per request (services/sampler/lora.py), loaded on first use, least recently used evicted.
        self.adapters = AdapterCache(self.pipe, capacity=int(params.get("adapter_cache", "") or 8))
        from services.sampler.fastpath import FastPathOptions, prepare

        try:
            fast_options = FastPathOptions.from_params(params)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        for spec in filter(None, (s.strip() for s in params.get("warmup", "").split(","))):
            width, height, steps = (int(x) for x in spec.split("x"))
            with torch.inference_mode():
                self.pipe(
                    prompt="warm-up",
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                )
        # GPU fast path: fused QKV, fp8, torch.compile (CUDA graphs on CUDA) warmed on the configured shapes.
        try:
            self.fast = prepare(self.pipe, fast_options, device)
        except ValueError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.preview_every = fast_options.preview_every
        pb_utils.Logger.log_info(f"{self.family} version {self.version} loaded from {pipeline_path} on {device}")

    # --- requests ---

    def _parse(self, request: Any) -> _Job:
        job = _Job(
            request=request,
            sender=request.get_response_sender(),
            prompt=str(_scalar(request, "PROMPT")),
            negative_prompt=str(_scalar(request, "NEGATIVE_PROMPT")),
            width=int(_scalar(request, "WIDTH")),
            height=int(_scalar(request, "HEIGHT")),
            steps=int(_scalar(request, "STEPS")),
            guidance=float(_scalar(request, "GUIDANCE")),
            seed=int(_scalar(request, "SEED")),
            num_images=int(_scalar(request, "NUM_IMAGES")),
            preview=bool(_scalar(request, "PREVIEW")),
            model=self.family,
            adapters=_adapters(request),
        )
        for name, value, limit in (("width", job.width, self.max_width), ("height", job.height, self.max_height)):
            if value <= 0 or value % 16 or value > limit:
                raise ValueError(f"{name}: must be a positive multiple of 16 up to {limit}, got {value}")
        if not 1 <= job.steps <= self.max_steps:
            raise ValueError(f"steps: must be in 1..{self.max_steps}, got {job.steps}")
        if not 1 <= job.num_images <= self.max_images:
            raise ValueError(f"num_images: must be in 1..{self.max_images}, got {job.num_images}")
        if not 0 <= job.seed < 2**63 - job.num_images:
            raise ValueError(f"seed: must be in 0..2^63-1, got {job.seed}")
        if not np.isfinite(job.guidance) or job.guidance < 0:
            raise ValueError(f"guidance: must be a finite number >= 0, got {job.guidance}")
        return job

    def execute(self, requests: list[Any]) -> None:
        jobs: list[_Job] = []
        for request in requests:
            try:
                jobs.append(self._parse(request))
            except Exception as exc:
                error = pb_utils.TritonError(f"invalid_argument: {exc}")
                request.get_response_sender().send(
                    pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                )
        for batch in self._batches(jobs):
            self._run(batch)
        return None

    def _batches(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Compatible requests (same size, steps, guidance) together, in arrival order, at most
        `max_batch_images` images per batch (a larger single request runs alone)."""
        groups: dict[tuple[Any, ...], list[list[_Job]]] = {}
        for job in jobs:
            chunks = groups.setdefault(job.key, [[]])
            current = chunks[-1]
            if current and sum(j.num_images for j in current) + job.num_images > self.max_batch_images:
                current = []
                chunks.append(current)
            current.append(job)
        return [chunk for chunks in groups.values() for chunk in chunks if chunk]

    # --- the pipeline ---

    def _run(self, batch: list[_Job]) -> None:
        torch = self.torch
        for job in batch:
            if job.request.is_cancelled():
                job.cancel(0)
        live = [j for j in batch if not j.done]
        if not live:
            return
        first = live[0]
        prompts = [j.prompt for j in live for _ in range(j.num_images)]
        negatives = [j.negative_prompt for j in live for _ in range(j.num_images)]
        generators = [torch.Generator().manual_seed(j.seed + i) for j in live for i in range(j.num_images)]
        total = first.steps
        batch_size = np.array([[len(live)]], dtype=np.int32)
        started = time.perf_counter()

        from services.sampler.fastpath import PreviewQueue, step_callback, to_uint8

        previews = PreviewQueue(self.preview_every) if any(j.preview for j in live) else None

        def progress(step: int, ready: list[Any]) -> None:  # step: 1-based, the steps done
            preview = ready[-1].images if ready else None  # the newest preview whose copy has completed
            offset = 0
            running = False
            for job in live:
                if not job.done and job.request.is_cancelled():
                    job.cancel(step)
                if not job.done:
                    running = True
                    outputs = [
                        pb_utils.Tensor("STEP", np.array([[step]], dtype=np.int32)),
                        pb_utils.Tensor("TOTAL", np.array([[total]], dtype=np.int32)),
                    ]
                    if job.preview and preview is not None:
                        part = np.ascontiguousarray(preview[offset : offset + job.num_images])
                        outputs.append(pb_utils.Tensor("PREVIEW", part[None]))
                    job.sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
                offset += job.num_images
            if not running:
                raise _AllCancelled()

        on_step = step_callback(self.fast, previews, progress)
        images_in_batch = len(prompts)

        from services.sampler.lora import AdapterError

        try:
            self.adapters.activate(first.adapters)  # the batch's LoRA set (none: the plain pipeline)
        except AdapterError as exc:  # a file gone or changed since it was registered, a fused model
            pb_utils.Logger.log_error(f"{self.family} batch of {len(live)}: adapters: {exc}")
            for job in live:
                job.fail(f"failed_precondition: {exc}")
            return
        try:
            with torch.inference_mode(), self.fast.running(first.width, first.height, images_in_batch, first.guidance):
                result = self.pipe(
                    **self._pipeline_kwargs(first, prompts, negatives, generators), callback_on_step_end=on_step
                )
        except _AllCancelled:
            return
        except Exception as exc:
            pb_utils.Logger.log_error(f"{self.family} batch of {len(live)} failed: {exc!r}")
            for job in live:
                job.fail(f"internal: generation failed: {type(exc).__name__}: {exc}")
            return
        if previews is not None:
            previews.drain()  # the images follow: previews still in flight are not sent
        # Exactly what the pipeline's PIL output does: round(x * 255) as uint8, computed on the device, one copy.
        images = to_uint8(result.images)
        compute = np.array([[time.perf_counter() - started]], dtype=np.float32)
        offset = 0
        for job in live:
            part = images[offset : offset + job.num_images]
            offset += job.num_images
            if job.done:
                continue
            seeds = np.array([[job.seed + i for i in range(job.num_images)]], dtype=np.int64)
            outputs = [
                pb_utils.Tensor("IMAGES", np.ascontiguousarray(part)[None]),
                pb_utils.Tensor("SEEDS", seeds),
                pb_utils.Tensor("STEP", np.array([[total]], dtype=np.int32)),
                pb_utils.Tensor("TOTAL", np.array([[total]], dtype=np.int32)),
                pb_utils.Tensor("BATCH", batch_size),
                pb_utils.Tensor("COMPUTE_SECONDS", compute),
            ]
            job.done = True
            job.sender.send(
                pb_utils.InferenceResponse(output_tensors=outputs), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            )

    def _pipeline_kwargs(self, first: _Job, prompts: list[str], negatives: list[str], generators: list[Any]) -> dict:
        """The pipeline call of a batch (`first`: its settings). Both families take the same arguments: one prompt,
        negative prompt (an empty one is encoded, as A1111 does, never zeroed) and seeded generator per image."""
        return {
            "prompt": prompts,
            "negative_prompt": negatives,
            "width": first.width,
            "height": first.height,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "generator": generators,
            "output_type": "pt",  # [n, 3, H, W] on the device: to uint8 there (fastpath.to_uint8), then one copy
        }

    def finalize(self) -> None:
        pb_utils.Logger.log_info(f"{getattr(self, 'family', '?')} version {getattr(self, 'version', '?')} unloading")
        self.pipe = None


def _adapters(request: Any) -> tuple[Any, ...]:
    """The optional ADAPTERS input (JSON list of {name, version, uri, sha256, weight}); absent or empty: none."""
    from services.sampler.lora import parse_adapters

    tensor = pb_utils.get_input_tensor_by_name(request, "ADAPTERS")
    if tensor is None:
        return ()
    values = tensor.as_numpy().reshape(-1)
    return parse_adapters(values[0]) if values.size else ()
