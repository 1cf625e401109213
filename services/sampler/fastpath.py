"""The sampler's GPU fast path (model code: the Triton model calls it at `initialize()` and per batch).

- `prepare(pipe, options, device)`: optional fused QKV projections, optional fp8 (torchao float8 dynamic-activation
  and weight quantization of the denoiser's Linear layers; CUDA only), `torch.compile` of the denoiser (CUDA graphs
  with mode `reduce-overhead`/`max-autotune` on CUDA; inductor on the CPU) warmed at load on the configured shapes
  (width x height x batch, the real pipeline run), then no recompiles in service: `FastPath.running()` sets the
  compiler's stance `eager_on_recompile`, so a shape that was not warmed runs eager (counted and logged) instead of
  compiling in the middle of serving.
- `PreviewQueue`: previews every k steps made on the device (latent -> RGB projection and uint8 there), copied into
  pinned memory without blocking and handed out once their CUDA event has completed, so no step waits for the host;
  on the CPU the same code is a plain copy.
- `to_uint8(images)`: the pipeline's `output_type="pt"` images -> [n, H, W, 3] uint8 on the device, then one copy;
  bit for bit the numpy path (`(np_images * 255).round().astype(np.uint8)`).

Works with any diffusers pipeline whose denoiser is `pipe.transformer` (AuraFlow) or `pipe.unet` (SDXL).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WARMUP_PROMPT = "warm-up"
_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")

# Cheap latent -> RGB projection of the SDXL-family VAE latents (AuraFlow and SDXL share it): previews only.
LATENT_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


@dataclass(frozen=True)
class Shape:
    """A warmed generation shape: image width and height, and images per pipeline batch."""

    width: int
    height: int
    batch: int = 1

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.batch}"


def parse_shapes(text: str, setting: str = "PONY_SAMPLER_COMPILE_SHAPES") -> tuple[Shape, ...]:
    """ "1024x1024x1, 832x1216x2" -> Shapes (batch 1 when left out); ValueError naming `setting` otherwise."""
    shapes = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        match = _SHAPE.match(spec)
        if not match:
            raise ValueError(f"{setting}: {spec!r} is not WIDTHxHEIGHT[xBATCH] (e.g. 1024x1024x1)")
        width, height, batch = int(match[1]), int(match[2]), int(match[3] or 1)
        if width <= 0 or height <= 0 or width % 16 or height % 16 or batch <= 0:
            raise ValueError(f"{setting}: {spec!r}: width and height must be positive multiples of 16, batch >= 1")
        shapes.append(Shape(width, height, batch))
    return tuple(shapes)


def _flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FastPathOptions:
    """What `prepare` does. `compile_mode` "" = no torch.compile."""

    compile_mode: str = ""
    shapes: tuple[Shape, ...] = ()
    fp8: bool = False
    fuse_qkv: bool = False
    preview_every: int = 1
    warmup_steps: int = 2
    warmup_guidance: float = 3.5  # > 1: the warm-up runs classifier-free guidance (denoiser batch 2 x images)
    fullgraph: bool = True

    def __post_init__(self) -> None:
        if self.compile_mode and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"PONY_SAMPLER_COMPILE_MODE: must be one of {', '.join(COMPILE_MODES)} (or empty), "
                f"got {self.compile_mode!r}"
            )
        if self.preview_every < 1:
            raise ValueError(f"PONY_SAMPLER_PREVIEW_EVERY: must be >= 1, got {self.preview_every}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps: must be >= 1, got {self.warmup_steps}")

    @classmethod
    def from_params(cls, params: dict[str, str]) -> FastPathOptions:
        """From the Triton model config's string parameters (`repository.render_config` writes them from the
        settings): `compile` (true/false), `compile_mode`, `compile_shapes`, `fp8`, `fuse_qkv`, `preview_every`."""
        mode = ""
        if _flag(params.get("compile", "false")):
            mode = params.get("compile_mode", "") or "reduce-overhead"
        shapes = parse_shapes(params.get("compile_shapes", ""))
        if mode and not shapes:  # the older `warmup` setting (WxHxSTEPS): its sizes, one image each
            sizes = [s.split("x")[:2] for s in params.get("warmup", "").split(",") if s.strip()]
            shapes = parse_shapes(",".join(f"{w.strip()}x{h.strip()}x1" for w, h in sizes), "PONY_SAMPLER_WARMUP")
        return cls(
            compile_mode=mode,
            shapes=shapes,
            fp8=_flag(params.get("fp8", "false")),
            fuse_qkv=_flag(params.get("fuse_qkv", "false")),
            preview_every=int(params.get("preview_every", "1") or 1),
        )


def denoiser_name(pipe: Any) -> str:
    """The attribute holding the pipeline's denoiser: `transformer` (AuraFlow, Flux, SD3) or `unet` (SDXL)."""
    for name in ("transformer", "unet"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet")


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _quantize_fp8(module: torch.nn.Module, device: str | torch.device) -> int:
    """torchao float8 dynamic-activation/weight quantization (per-row scales) of `module`'s Linear layers whose
    sizes the float8 matmul takes (multiples of 16); the count of layers quantized."""
    if not _is_cuda(device):
        raise ValueError(f"PONY_SAMPLER_FP8: float8 needs a CUDA GPU (compute capability 8.9+), the device is {device}")
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if (major, minor) < (8, 9):
        raise ValueError(f"PONY_SAMPLER_FP8: float8 needs compute capability 8.9+ (Ada, Hopper), got {major}.{minor}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ValueError(f"PONY_SAMPLER_FP8: needs the torchao package ({exc})") from None

    picked = 0

    def wanted(mod: torch.nn.Module, fqn: str) -> bool:
        nonlocal picked
        ok = isinstance(mod, torch.nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
        picked += ok
        return ok

    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=wanted)
    return picked


@dataclass
class FastPath:
    """A prepared pipeline: which shapes were warmed, and how many batches ran eager for want of a warmed shape."""

    pipe: Any
    options: FastPathOptions
    device: str
    compiled: bool = False
    warmed: set[tuple[int, int, int]] = field(default_factory=set)  # (width, height, denoiser batch)
    eager_batches: int = 0
    warmup_s: float = 0.0
    fp8_layers: int = 0

    @staticmethod
    def denoiser_batch(images: int, guidance: float) -> int:
        """The denoiser's batch for `images` images: twice that with classifier-free guidance (guidance > 1)."""
        return images * (2 if guidance > 1.0 else 1)

    def is_warm(self, width: int, height: int, images: int, guidance: float) -> bool:
        return (width, height, self.denoiser_batch(images, guidance)) in self.warmed

    @contextmanager
    def running(self, width: int, height: int, images: int, guidance: float) -> Iterator[bool]:
        """Around one pipeline batch: the compiled denoiser runs when the shape was warmed; any other shape runs
        eager (`eager_on_recompile`: guards that fail never compile in service), counted and logged. Yields whether
        the shape was warm."""
        if not self.compiled:
            yield False
            return
        warm = self.is_warm(width, height, images, guidance)
        if not warm:
            self.eager_batches += 1
            log.warning(
                "sampler fast path: %dx%d, %d images (guidance %.2f) was not warmed: runs eager (%d so far); "
                "add it to PONY_SAMPLER_COMPILE_SHAPES",
                width,
                height,
                images,
                guidance,
                self.eager_batches,
            )
        with torch.compiler.set_stance("eager_on_recompile" if warm else "force_eager"):
            yield warm

    def step_begin(self) -> None:
        """Marks a new denoising step for CUDA graph trees (outputs of the previous replay may be overwritten)."""
        if self.compiled and _is_cuda(self.device) and self.options.compile_mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()


def utf8_locale() -> None:
    """Inductor reads its kernel templates with the locale's encoding; Triton's Python stub embeds an interpreter
    that runs in the C (ASCII) locale, where that read fails (UnicodeDecodeError). Switch LC_CTYPE to UTF-8 there,
    before diffusers is imported (it imports inductor's kernels, and a failed import leaves them unregistered)."""
    import locale

    if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
        return
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            log.info("sampler fast path: LC_CTYPE set to %s for torch.compile", name)
            return
        except locale.Error:
            continue
    log.warning("sampler fast path: no UTF-8 locale; torch.compile may fail to read inductor's templates")


def prepare(pipe: Any, options: FastPathOptions, device: str | torch.device = "cpu") -> FastPath:
    """Applies `options` to `pipe` in place (fused QKV, fp8, torch.compile) and warms the compiled denoiser on
    `options.shapes` by running the pipeline. Raises ValueError naming the setting for what cannot be done here
    (fp8 on a CPU, torchao missing, an unknown compile mode)."""
    import time

    device = str(device)
    fast = FastPath(pipe=pipe, options=options, device=device)
    name = denoiser_name(pipe)
    denoiser = getattr(pipe, name)
    if options.fuse_qkv:
        if hasattr(denoiser, "fuse_qkv_projections"):
            try:
                denoiser.fuse_qkv_projections()
                log.info("sampler fast path: fused QKV projections in the %s", name)
            except ValueError as exc:  # e.g. added KV projections
                log.warning("sampler fast path: QKV projections not fused: %s", exc)
        else:
            log.warning("sampler fast path: %s has no fuse_qkv_projections(); left unfused", type(denoiser).__name__)
    if options.fp8:
        fast.fp8_layers = _quantize_fp8(denoiser, device)
        log.info("sampler fast path: float8 on %d Linear layers of the %s", fast.fp8_layers, name)
    if not options.compile_mode:
        return fast
    mode: str | None = options.compile_mode
    if not _is_cuda(device) and mode in ("reduce-overhead", "max-autotune"):
        mode = None  # CUDA graphs are CUDA's: inductor on the CPU compiles the same graph without them
    if mode == "default":
        mode = None
    utf8_locale()
    denoiser.compile(mode=mode, fullgraph=options.fullgraph, dynamic=False)
    fast.compiled = True
    started = time.perf_counter()
    on_step = step_callback(fast, None, lambda step, ready: None)
    for i, shape in enumerate(options.shapes):

        def warm(shape: Shape = shape) -> None:
            with torch.inference_mode():
                # Twice on CUDA: the first call compiles, the second records the CUDA graphs.
                for _ in range(2 if _is_cuda(device) else 1):
                    pipe(
                        prompt=[WARMUP_PROMPT] * shape.batch,
                        width=shape.width,
                        height=shape.height,
                        num_inference_steps=options.warmup_steps,
                        guidance_scale=options.warmup_guidance,
                        generator=[torch.Generator().manual_seed(i) for i in range(shape.batch)],
                        output_type="latent",
                        callback_on_step_end=on_step,
                    )

        try:
            warm()
        except Exception as exc:  # a graph break under fullgraph=True: compile it in pieces rather than not load
            if i or not options.fullgraph:
                raise
            log.warning(
                "sampler fast path: fullgraph compile of the %s failed (%s); compiling with graph breaks", name, exc
            )
            torch._dynamo.reset()
            denoiser.compile(mode=mode, fullgraph=False, dynamic=False)
            warm()
        fast.warmed.add((shape.width, shape.height, fast.denoiser_batch(shape.batch, options.warmup_guidance)))
    if _is_cuda(device):
        torch.cuda.synchronize(torch.device(device))
    fast.warmup_s = time.perf_counter() - started
    log.info(
        "sampler fast path: %s compiled (mode %s), warmed %s in %.1f s",
        name,
        options.compile_mode,
        ", ".join(map(str, options.shapes)) or "no shapes",
        fast.warmup_s,
    )
    return fast


# --- images and previews on the device ---


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] images in [0, 1] (`output_type="pt"`, on any device and dtype) -> [n, H, W, 3] uint8 on the
    host: round(x * 255) computed in float32 on the device, then one copy. Equal bit for bit to
    `(pipe(..., output_type="np").images * 255).round().astype(np.uint8)` (the numpy path converts to float32 too)."""
    pixels = (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
    return pixels.contiguous().cpu().numpy()


@dataclass
class Preview:
    """A preview made at `step` (1-based): [n, h, w, 3] uint8 RGB at 1/8 of the image size."""

    step: int
    images: np.ndarray


@dataclass
class _Pending:
    step: int
    host: torch.Tensor
    event: Any  # torch.cuda.Event, or None on the CPU (the copy is done already)


class PreviewQueue:
    """Previews every `every` steps without a per-step host sync: `offer(step, latents)` projects and converts on the
    device and starts a non-blocking copy into pinned memory with a CUDA event; `ready()` hands out the previews
    whose event has completed (a cheap query at a later step); `drain()` waits for the rest (the end of the run).
    On the CPU the copy is a plain one and a preview is ready at once."""

    def __init__(self, every: int = 1) -> None:
        self.every = max(1, every)
        self._pending: list[_Pending] = []
        self._weights: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _projection(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, torch.float32)
        if key not in self._weights:
            self._weights[key] = (
                torch.tensor(LATENT_RGB, dtype=torch.float32, device=device),
                torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=device),
            )
        return self._weights[key]

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def offer(self, step: int, latents: torch.Tensor) -> bool:
        """Starts the preview of `latents` ([n, 4, h, w]) for `step` (1-based) when it is a preview step."""
        if not self.wants(step):
            return False
        weight, bias = self._projection(latents.device)
        rgb = torch.einsum("nchw,cr->nhwr", latents.detach().float(), weight) + bias
        pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).contiguous()
        if latents.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(latents.device))
        else:
            host, event = pixels.cpu(), None
        self._pending.append(_Pending(step, host, event))
        return True

    def ready(self) -> list[Preview]:
        """The previews whose copy has completed, oldest first (never waits)."""
        out = []
        while self._pending and (self._pending[0].event is None or self._pending[0].event.query()):
            done = self._pending.pop(0)
            out.append(Preview(done.step, done.host.numpy()))
        return out

    def drain(self) -> list[Preview]:
        """Every preview still pending, waiting for their copies."""
        for pending in self._pending:
            if pending.event is not None:
                pending.event.synchronize()
        return self.ready()


def step_callback(
    fast: FastPath | None, previews: PreviewQueue | None, inner: Callable[[int, list[Preview]], None]
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A `callback_on_step_end` for a diffusers pipeline: marks the CUDA graph step, offers the latents to the
    preview queue, then calls `inner(step, ready_previews)` (step 1-based) to send progress (it may raise to stop)."""

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if fast is not None:
            fast.step_begin()
        ready: list[Preview] = []
        if previews is not None:
            previews.offer(step + 1, kwargs["latents"])
            ready = previews.ready()
        inner(step + 1, ready)
        return {}

    return on_step
