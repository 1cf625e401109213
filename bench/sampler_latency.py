"""Sampler latency and throughput: end to end through gRPC + Triton against a direct diffusers call, in one run.

Default (what a CPU can run, a minute or two): both families' tiny models, `pony_v7` (AuraFlow) and `pony_v6`
(SDXL), served by one sampler + tritonserver; per family p50/p95 of gRPC + Triton and of the direct diffusers call
(interleaved), the added milliseconds, 8-client throughput, printed side by side. `--compiled` adds the direct
pipeline compiled by the fast path (inductor on the CPU) as a column.

`--full` (CUDA, an H100/H200): the full-size V7 (random bf16 weights built on the GPU, as the Triton model's
`random_init: full` does), 1024x1024, 28 steps: gRPC + Triton (the fast path: torch.compile with CUDA graphs warmed
at load, device uint8, encoding pool, raw pixels) against plain diffusers eager and compiled (`torch.compile`, the
anchor's way), bf16 and fp8 (torchao float8: quality vs bf16 at the same seeds as PSNR and CLIP image similarity),
8-client images/min. Targets: <= 3.5 s lossless bf16, <= 2.0 s fp8 (anchor: 4.43 s compiled diffusers on one
H100, /work/shared/ref/README.md). Partial results are written to $OUT/sampler_latency.json after every phase.

    .venv/bin/python bench/sampler_latency.py [--size 128 --steps 8 --runs 20 --clients 8 --families pony_v7,pony_v6]
    .venv/bin/python bench/sampler_latency.py --full [--runs 3 --no-fp8 --clip <CLIP folder>]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANCHOR_COMPILED_1024_28_S = 4.43
TARGET_BF16_S = 3.5
TARGET_FP8_S = 2.0
PROMPT = "a pony in a meadow under a blue sky, bright colors, detailed illustration"
FAMILY_FOLDERS = {"pony_v7": "auraflow", "pony_v6": "sdxl"}
FAMILY_MODULES = {"pony_v7": "pony_common.models.auraflow", "pony_v6": "pony_common.models.sdxl"}
FAMILY_LABELS = {"pony_v7": "pony_v7 (AuraFlow)", "pony_v6": "pony_v6 (SDXL)"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class ServerThread:
    """The sampler (and its tritonserver) in a background event loop."""

    def __init__(self, settings: Any) -> None:
        from pony_common.grpc.server import start_server
        from services.sampler.app import create_service

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = self._run(start_server(settings, create_service(settings), 0, "127.0.0.1"))
        try:
            self._run(self.running.wait_ready(1800), timeout=1810)
        except BaseException:  # a model that fails to load (fp8 without torchao): stop what was started
            self.stop()
            raise

    def _run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.running.port

    def stop(self) -> None:
        self._run(self.running.stop(0), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Results(dict):
    """The figures so far; written to $OUT/sampler_latency.json after every phase (a run cut short keeps them)."""

    def save(self) -> None:
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "sampler_latency.json").write_text(json.dumps(self, indent=1, default=str))


def decode_png(png: bytes) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def psnr(a: Any, b: Any) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def clip_similarity(clip_path: str, pairs: list[tuple[Any, Any]], device: str) -> float:
    """Mean cosine similarity of the CLIP image embeddings of each pair (uint8 arrays)."""
    from PIL import Image

    from pony_common.models.clip import ClipImageTower

    tower = ClipImageTower.shared(clip_path, device=device)
    left = tower.embed([Image.fromarray(a) for a, _ in pairs])
    right = tower.embed([Image.fromarray(b) for _, b in pairs])
    left = left / left.norm(dim=-1, keepdim=True)
    right = right / right.norm(dim=-1, keepdim=True)
    return float((left * right).sum(-1).mean())


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def throughput(client: Any, options: dict[str, Any], clients: int, per_client: int) -> tuple[float, dict[int, int]]:
    """Images per second of `clients` concurrent callers, `per_client` requests each; the Triton batch sizes seen."""
    batches: Counter[int] = Counter()

    def one_client(c: int) -> None:
        for k in range(per_client):
            resp = client.generate(PROMPT, seed=1000 + c * 100 + k, **options)
            batches[resp.batch_size] += 1

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    return clients * per_client / (time.perf_counter() - t), dict(sorted(batches.items()))


# --- default: the tiny families on the CPU ---


def direct_pipeline(models: Path, family: str) -> Any:
    import importlib

    return importlib.import_module(FAMILY_MODULES[family]).load_pipeline(str(models / FAMILY_FOLDERS[family]))


def bench_family(args: argparse.Namespace, client: Any, models: Path, family: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from services.sampler.fastpath import FastPathOptions, Shape, prepare

    size, steps = args.size, args.steps
    pipe = direct_pipeline(models, family)
    no_sync: Callable[[], None] = lambda: None  # noqa: E731

    def direct(seed: int) -> Any:
        return np.asarray(
            pipe(
                PROMPT,
                negative_prompt="",
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
        )

    options = dict(model=family, width=size, height=size, steps=steps, guidance=args.guidance, raw_prompt=True)
    first = client.generate(PROMPT, seed=0, **options)  # both paths pay their one-time costs first
    same = direct(0)
    out: dict[str, Any] = {
        "max_pixel_diff_vs_direct": int(np.abs(decode_png(first.images[0].png).astype(int) - same.astype(int)).max())
    }
    t_direct, t_grpc = [], []
    for i in range(args.runs):
        t_direct.append(timed(lambda i=i: direct(i + 1), no_sync)[0])
        t_grpc.append(timed(lambda i=i: client.generate(PROMPT, seed=i + 1, **options), no_sync)[0])
    rate, batches = throughput(client, options, args.clients, args.per_client)
    d50, d95, g50, g95 = (percentile(v, q) for v in (t_direct, t_grpc) for q in (0.5, 0.95))
    out.update(
        direct_p50_s=d50,
        direct_p95_s=d95,
        grpc_triton_p50_s=g50,
        grpc_triton_p95_s=g95,
        added_p50_ms=(g50 - d50) * 1000,
        added_p95_ms=(g95 - d95) * 1000,
        throughput_images_per_s=rate,
        direct_sequential_images_per_s=1.0 / d50,  # the median: a shared CPU's stalls would flatter batching
        batch_sizes_seen=batches,
    )
    if args.compiled:
        fast = prepare(pipe, FastPathOptions(compile_mode="reduce-overhead", shapes=(Shape(size, size, 1),)), "cpu")
        with fast.running(size, size, 1, args.guidance):
            direct(0)
            t_compiled = [timed(lambda i=i: direct(i + 1), no_sync)[0] for i in range(args.runs)]
        out.update(
            direct_compiled_p50_s=percentile(t_compiled, 0.5), direct_compiled_p95_s=percentile(t_compiled, 0.95)
        )
    return out


def print_side_by_side(args: argparse.Namespace, per_family: dict[str, dict[str, Any] | str]) -> None:
    out = print  # the figures are this script's output
    names = list(per_family)
    width = 30

    def row(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
        cells = [fmt(v) if isinstance(v, dict) else str(v) for v in per_family.values()]
        out(f"  {label:<24}" + "".join(f"{c:>{width}}" for c in cells))

    out(
        f"sampler latency, {args.size}x{args.size}, {args.steps} steps, cpu, {args.runs} samples each (interleaved); "
        f"throughput: {args.clients} clients x {args.per_client}"
    )
    out(f"  {'':<24}" + "".join(f"{FAMILY_LABELS.get(n, n):>{width}}" for n in names))
    ms = lambda key: lambda v: f"{v[key] * 1000:.1f} ms"  # noqa: E731
    row("direct diffusers p50", ms("direct_p50_s"))
    row("direct diffusers p95", ms("direct_p95_s"))
    if args.compiled:
        row("direct compiled p50", ms("direct_compiled_p50_s"))
        row("direct compiled p95", ms("direct_compiled_p95_s"))
    row("gRPC + Triton p50", ms("grpc_triton_p50_s"))
    row("gRPC + Triton p95", ms("grpc_triton_p95_s"))
    row("added p50", lambda v: f"{v['added_p50_ms']:+.1f} ms")
    row("added p95", lambda v: f"{v['added_p95_ms']:+.1f} ms")
    row("ratio p50", lambda v: f"{v['grpc_triton_p50_s'] / v['direct_p50_s']:.3f}")
    row(
        f"{args.clients}-client throughput",
        lambda v: f"{v['throughput_images_per_s']:.2f}/s {v['throughput_images_per_s'] * 60:.0f}/min",
    )
    row("direct sequential", lambda v: f"{v['direct_sequential_images_per_s']:.2f}/s")
    row("batch sizes", lambda v: json.dumps(v["batch_sizes_seen"]))
    row("max pixel diff (direct)", lambda v: str(v["max_pixel_diff_vs_direct"]))


def run_default(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import grpc

    from pony_common.config import Settings
    from services.sampler.client import SamplerClient
    from services.stack.tiny import build_tiny_models

    args.size = args.size or 128
    args.steps = args.steps or 8
    args.runs = args.runs or 20
    args.per_client = args.per_client or 4
    tmp = Path(tempfile.mkdtemp(prefix="sampler-bench-"))
    models = Path(os.environ.get("PONY_MODELS_DIR") or tmp / "models")
    if not all((models / FAMILY_FOLDERS[f]).exists() for f in FAMILY_FOLDERS):
        build_tiny_models(models)
    wanted = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in FAMILY_FOLDERS]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)} (known: {', '.join(FAMILY_FOLDERS)})")
    served = [f for f in wanted if (models / FAMILY_FOLDERS[f]).exists()]
    settings = Settings.from_env(
        {},
        state_dir=str(tmp / "state"),
        models_dir=str(models),
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        sampler_safety="off",  # the figure is the sampler + Triton path against diffusers alone
        sampler_families=tuple(served),
        sampler_default_model=served[0],
        sampler_max_batch_size=4,
        sampler_batch_delay_us=5_000,
        log_json=False,
        log_level="WARNING",
    )
    started = time.perf_counter()
    server = ServerThread(settings)
    load_s = time.perf_counter() - started
    results = Results(device="cpu", size=args.size, steps=args.steps, triton_load_s=load_s, families={})
    per_family: dict[str, dict[str, Any] | str] = {f: "not served" for f in wanted}
    client_settings = settings.replace(sampler_addr=f"127.0.0.1:{server.port}", rpc_timeout_s=1800)
    try:
        with SamplerClient(client_settings) as client:
            for family in served:
                try:
                    per_family[family] = bench_family(args, client, models, family)
                except grpc.RpcError as exc:
                    per_family[family] = f"failed: {exc.code().name}"
                    print(f"{family}: sampler call failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
                results["families"][family] = per_family[family]
                results.save()
    finally:
        server.stop()
    print_side_by_side(args, per_family)
    print(json.dumps(results, default=str))
    return 0 if all(isinstance(v, dict) for v in per_family.values()) else 1


# --- --full: the full-size V7 on CUDA ---


def full_settings(args: argparse.Namespace, tmp: Path, models: Path, fp8: bool) -> Any:
    from pony_common.config import Settings

    shapes = ",".join(f"{args.size}x{args.size}x{b}" for b in sorted({1, args.batch}))
    return Settings.from_env(
        {},
        state_dir=str(tmp / ("state-fp8" if fp8 else "state")),
        models_dir=str(models),
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        sampler_safety="off",
        sampler_families=("pony_v7",),
        sampler_max_batch_size=args.batch,
        sampler_batch_delay_us=200_000,  # the 8 clients' requests fill batches of `args.batch`
        device="cuda",
        dtype="bfloat16",
        sampler_random_init="full",
        sampler_compile=True,
        sampler_compile_mode=args.compile_mode,
        sampler_compile_shapes=shapes,
        sampler_fp8=fp8,
        sampler_fuse_qkv=args.fuse_qkv,
        model_load_attempts=1,  # a load that fails (fp8 without torchao) is reported, not retried on the GPU's time
        log_json=False,
        log_level="WARNING",
    )


def run_triton(
    args: argparse.Namespace, tmp: Path, models: Path, fp8: bool, results: Results, key: str
) -> dict[int, Any]:
    """One sampler + Triton (bf16 or fp8): load (compile + warm-up), latency samples, throughput; the images of
    the latency seeds (for the quality comparison)."""
    from services.sampler.client import SamplerClient

    settings = full_settings(args, tmp, models, fp8)
    started = time.perf_counter()
    server = ServerThread(settings)
    out: dict[str, Any] = {"load_compile_warmup_s": time.perf_counter() - started}
    results[key] = out
    results.save()
    images: dict[int, Any] = {}
    options = dict(width=args.size, height=args.size, steps=args.steps, guidance=args.guidance, raw_prompt=True)
    try:
        with SamplerClient(settings.replace(sampler_addr=f"127.0.0.1:{server.port}", rpc_timeout_s=1800)) as client:
            client.generate(PROMPT, seed=0, **options)
            samples = []
            for i in range(args.runs):
                t = time.perf_counter()
                resp = client.generate(PROMPT, seed=i + 1, **options)
                samples.append(time.perf_counter() - t)
                images[i + 1] = decode_png(resp.images[0].png)
            out.update(p50_s=percentile(samples, 0.5), p95_s=percentile(samples, 0.95), samples_s=samples)
            results.save()
            rate, batches = throughput(client, options, args.clients, args.per_client)
            out.update(images_per_min=rate * 60, batch_sizes_seen=batches)
            results.save()
    finally:
        server.stop()
    return images


def run_full(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import gc

    import numpy as np
    import torch
    from diffusers import AuraFlowPipeline
    from transformers import AutoTokenizer

    from pony_common.models.auraflow import build_auraflow_components
    from services.stack.tiny import build_tiny_models

    if not torch.cuda.is_available():
        parser.error("--full needs CUDA")
    args.size = args.size or 1024
    args.steps = args.steps or 28
    args.runs = args.runs or 3
    args.per_client = args.per_client or 2
    torch.backends.cuda.matmul.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="sampler-bench-"))
    models = Path(os.environ.get("PONY_MODELS_DIR") or tmp / "models")
    if not (models / "auraflow").exists():
        build_tiny_models(models)  # only the AuraFlow tokenizer (and the CLIP for the similarity) are used
    results = Results(
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        size=args.size,
        steps=args.steps,
        runs=args.runs,
        clip=args.clip or str(models / "clip"),
    )
    sync = torch.cuda.synchronize

    # 1. gRPC + Triton, bf16 (the fast path, compiled and warmed at load).
    triton_bf16 = run_triton(args, tmp, models, False, results, "triton_bf16")
    # 2. plain diffusers, the same random weights (seed 0), eager then torch.compile as the anchor does.
    tokenizer = AutoTokenizer.from_pretrained(str(models / "auraflow" / "tokenizer"))
    pipe = AuraFlowPipeline(**build_auraflow_components(tokenizer, size="full", device="cuda", dtype=torch.bfloat16))
    pipe.set_progress_bar_config(disable=True)

    def direct(seed: int) -> Any:
        return pipe(
            PROMPT,
            negative_prompt="",
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        ).images[0]

    pipe(PROMPT, width=args.size, height=args.size, num_inference_steps=2, output_type="latent")
    eager = [timed(lambda i=i: direct(i + 1), sync)[0] for i in range(args.runs)]
    results["diffusers_eager"] = {"p50_s": percentile(eager, 0.5), "samples_s": eager}
    results.save()
    pipe.transformer = torch.compile(pipe.transformer)
    t = time.perf_counter()
    for _ in range(2):
        pipe(PROMPT, width=args.size, height=args.size, num_inference_steps=2, output_type="latent")
    compile_s = time.perf_counter() - t
    compiled = [timed(lambda i=i: direct(i + 1), sync)[0] for i in range(args.runs)]
    results["diffusers_compiled"] = {
        "p50_s": percentile(compiled, 0.5),
        "samples_s": compiled,
        "compile_warmup_s": compile_s,
    }
    results.save()
    pipe = None  # frees the direct pipeline's GPU memory for the fp8 server
    gc.collect()
    torch.cuda.empty_cache()
    # 3. gRPC + Triton, fp8: quality against the bf16 images of the same seeds.
    if args.fp8:
        try:
            triton_fp8 = run_triton(args, tmp, models, True, results, "triton_fp8")
        except Exception as exc:  # torchao missing, an older GPU: the bf16 figures stand
            results["triton_fp8"] = {"error": f"{type(exc).__name__}: {exc}"}
            triton_fp8 = {}
        pairs = [(triton_bf16[s], triton_fp8[s]) for s in sorted(triton_fp8) if s in triton_bf16]
        if pairs:
            results["triton_fp8"].update(
                psnr_vs_bf16_db=float(np.mean([psnr(a, b) for a, b in pairs])),
                clip_similarity_vs_bf16=clip_similarity(results["clip"], pairs, "cuda"),
            )
        results.save()
    print_full(args, results)
    print(json.dumps(results, default=str))
    return 0


def print_full(args: argparse.Namespace, results: Results) -> None:
    out = print
    out(
        f"sampler, full-size V7 (random bf16 weights), {args.size}x{args.size}, {args.steps} steps, {results['device']}"
    )
    eager, compiled = results.get("diffusers_eager", {}), results.get("diffusers_compiled", {})
    for label, key in (("diffusers eager", eager), ("diffusers compiled", compiled)):
        if "p50_s" in key:
            out(f"  {label:<30} p50 {key['p50_s']:7.2f} s")
    for name, target in (("triton_bf16", TARGET_BF16_S), ("triton_fp8", TARGET_FP8_S)):
        r = results.get(name, {})
        if "error" in r:
            out(f"  gRPC + Triton {name[7:]:<16} not measured: {r['error']}")
            continue
        if "p50_s" not in r:
            continue
        ok = "meets" if r["p50_s"] <= target else "misses"
        out(
            f"  gRPC + Triton {name[7:]:<16} p50 {r['p50_s']:7.2f} s   p95 {r['p95_s']:7.2f} s   "
            f"target {target} s: {ok}; load+compile {r['load_compile_warmup_s']:.0f} s"
        )
        if "images_per_min" in r:
            out(
                f"    {args.clients}-client throughput {r['images_per_min']:.1f} images/min, "
                f"batches {r['batch_sizes_seen']}"
            )
        if "psnr_vs_bf16_db" in r:
            out(
                f"    quality vs bf16 (same seeds): PSNR {r['psnr_vs_bf16_db']:.2f} dB, "
                f"CLIP image similarity {r['clip_similarity_vs_bf16']:.4f} ({results['clip']})"
            )
    if "p50_s" in results.get("triton_bf16", {}):
        out(
            f"  vs the compiled anchor {ANCHOR_COMPILED_1024_28_S} s (H100): "
            f"ratio {results['triton_bf16']['p50_s'] / ANCHOR_COMPILED_1024_28_S:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--full", action="store_true", help="full-size V7 on CUDA (bf16 and fp8, torch.compile)")
    parser.add_argument("--families", default="pony_v7,pony_v6", help="families to measure (default mode)")
    parser.add_argument("--compiled", action="store_true", help="default mode: add the compiled direct pipeline")
    parser.add_argument("--size", type=int, default=None, help="pixels per side (default 128; --full 1024)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default 8; --full 28)")
    parser.add_argument("--runs", type=int, default=None, help="latency samples of each path (default 20; --full 3)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput figure")
    parser.add_argument("--per-client", type=int, default=None, help="requests per client (default 4; --full 2)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--batch", type=int, default=4, help="--full: Triton's max batch (also a warmed shape)")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="--full: the Triton model's compile mode")
    parser.add_argument("--fuse-qkv", action="store_true", help="--full: fused QKV projections in the Triton model")
    parser.add_argument("--no-fp8", dest="fp8", action="store_false", help="--full: skip the fp8 server")
    parser.add_argument("--clip", default="", help="--full: CLIP folder for the image similarity (default: tiny)")
    args = parser.parse_args(argv)
    # Both paths share the CPU cores here: OpenMP workers that spin after a call would slow the other path
    # (Triton's stub gets the same setting from services/sampler/triton_server.py). Set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    logging.basicConfig(level=logging.WARNING)
    return run_full(args, parser) if args.full else run_default(args, parser)


if __name__ == "__main__":
    raise SystemExit(main())
