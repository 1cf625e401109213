"""The sampler's ponyctl verb: generate (and --read a PNG's parameters)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings
from services.sampler.families import KINDS
from services.sampler.prompts import RATINGS, SOURCES


def register(sub: argparse._SubParsersAction) -> None:
    _register_generate(sub)


def _register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images through the sampler (or --read a PNG's parameters)",
        description="Generates through pony.v1.Sampler at PONY_SAMPLER_ADDR and writes PNGs that carry their "
        "parameters. With several images, FILE.png becomes FILE-0.png, FILE-1.png, ...",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (special tags are added in front)")
    p.add_argument(
        "--model", default=None, help="model family: pony_v7 (AuraFlow) | pony_v6 (SDXL); default: the sampler's"
    )
    p.add_argument("--out", "-o", help="PNG file to write")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: random)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--images", type=int, default=None, help="number of images")
    p.add_argument("--score", type=int, default=None, help="score N or better (0..9), in the family's tag convention")
    p.add_argument("--style", type=int, action="append", default=[], help="style cluster id (repeatable)")
    p.add_argument("--source", choices=SOURCES, default=None)
    p.add_argument("--rating", choices=RATINGS, default=None)
    p.add_argument("--palette", action="append", default=[], help="palette colour, e.g. red, sky_blue (repeatable)")
    p.add_argument("--style-family", default=None, help="the {family} of a family-prefixed style tag format")
    p.add_argument("--raw", action="store_true", help="send the prompt as written (no special tags)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[:VERSION][=WEIGHT]",
        help="a registered LoRA adapter (repeatable; version default: the newest, weight default: 1)",
    )
    p.add_argument("--read", metavar="PNG", help="print the parameters stored in a generated PNG and exit")
    p.add_argument("--json", action="store_true", help="with --read: print the JSON parameters")
    p.add_argument("--timeout", type=float, default=None, help="seconds (default: PONY_SAMPLER_JOB_TIMEOUT_S)")
    p.set_defaults(func=_run_generate)


def _read(args: argparse.Namespace) -> int:
    from services.sampler.pnginfo import TEXT_KEY, read_parameters

    path = Path(args.read)
    if not path.is_file():
        raise UsageError(f"--read {args.read}: no such file")
    try:
        params = read_parameters(path)
    except ValueError as exc:
        raise UsageError(f"--read {args.read}: {exc}") from None
    if args.json:
        sys.stdout.write(json.dumps({k: v for k, v in params.items() if k != TEXT_KEY}, indent=1, sort_keys=True))
    else:
        sys.stdout.write(params[TEXT_KEY])
    sys.stdout.write("\n")
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.prompt is None:
        raise UsageError("a PROMPT is required (or --read FILE.png)")
    if not args.out:
        raise UsageError("--out FILE.png is required")
    for name in ("width", "height", "steps", "images"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be a positive number, got {value}")
    if args.model is not None and args.model.strip() not in KINDS:
        raise UsageError(f"--model must be one of {', '.join(KINDS)}, got {args.model!r}")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.score is not None and not 0 <= args.score <= 9:
        raise UsageError(f"--score must be in 0..9, got {args.score}")
    if args.guidance is not None and not args.guidance >= 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if any(s < 0 for s in args.style):
        raise UsageError("--style ids must be >= 0")
    from services.sampler.client import lora_ref

    for value in args.lora:
        try:
            lora_ref(value)
        except ValueError as exc:
            raise UsageError(f"--lora: {exc}") from None


def _outputs(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    suffix = out.suffix or ".png"
    return [out.with_name(f"{out.stem}-{i}{suffix}") for i in range(count)]


def _run_generate(args: argparse.Namespace, settings: Settings) -> int:
    if args.read:
        return _read(args)
    _check(args)
    import grpc

    from services.sampler.client import SamplerClient

    out = Path(args.out)
    if not out.parent.exists():
        raise UsageError(f"--out {args.out}: folder {out.parent} does not exist")
    options = {
        "model": args.model,
        "negative_prompt": args.negative,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance": args.guidance,
        "seed": args.seed,
        "num_images": args.images,
        "score": args.score,
        "style_clusters": args.style,
        "source": args.source,
        "rating": args.rating,
        "palette": args.palette,
        "style_family": args.style_family,
        "raw_prompt": args.raw or None,
        "adapters": args.lora,
    }
    with SamplerClient(settings, timeout=args.timeout or settings.sampler.job_timeout_s) as client:
        try:
            response = client.generate(args.prompt, **options)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise UsageError(details) from None
            fix = (
                "; is it running? start it with `ponyctl serve sampler` or point PONY_SAMPLER_ADDR at it"
                if code == grpc.StatusCode.UNAVAILABLE
                else ""
            )
            sys.stderr.write(f"ponyctl generate: sampler at {settings.sampler_addr}: {code.name}: {details}{fix}\n")
            return 1
    if response.safety != 1:  # SAFETY_STATUS_CHECKED
        sys.stderr.write(f"warning: {response.safety_note or 'images were not safety-checked'}\n")
    paths = _outputs(out, len(response.images))
    for path, image in zip(paths, response.images, strict=True):
        path.write_bytes(image.png)
        sys.stdout.write(
            f"{path}\tseed={image.seed}\tmodel={response.provenance.model}:{response.provenance.model_version}\n"
        )
    for blocked in response.blocked:
        reasons = "; ".join(f"{r.rule_id}: {r.message}" for r in blocked.reasons)
        sys.stderr.write(f"seed {blocked.seed} blocked by the safety check: {reasons}\n")
    return 0 if response.images else 1
