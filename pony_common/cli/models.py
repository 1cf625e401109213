"""`ponyctl models tiny DIR` (deterministic tiny models of the real architectures) and `ponyctl models triton-repo
DIR` (the Triton model repository of pony_v7, as the sampler renders it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model files")
    msub = p.add_subparsers(dest="models_command", required=True, parser_class=type(p))
    t = msub.add_parser("tiny", help="write tiny models (same classes, small configs) to DIR")
    t.add_argument("dir", nargs="?", default=None, help="target folder (default: PONY_MODELS_DIR)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_tiny)
    r = msub.add_parser(
        "triton-repo",
        help="render the Triton model repository of pony_v7 (config.pbtxt, version 1) into DIR",
        description="Writes DIR/pony_v7/config.pbtxt from the settings (PONY_SAMPLER_*, PONY_DEVICE, PONY_DTYPE) "
        "and, when DIR holds no version yet, version 1 serving --model. Existing versions are kept. "
        "The sampler renders the same files at start; this command lets them exist before Triton starts.",
    )
    r.add_argument("dir", nargs="?", default=None, help="repository folder (default: PONY_TRITON_REPO)")
    r.add_argument("--model", default="", help="pipeline of version 1 (default: PONY_SAMPLER_MODEL, else the tiny one)")
    r.set_defaults(func=run_triton_repo)


def run_tiny(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.models.tiny import build_tiny_models

    out = Path(args.dir or settings.models_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    written = build_tiny_models(out, seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


def run_triton_repo(args: argparse.Namespace, settings: Settings) -> int:
    from services.sampler.repository import MODEL_NAME, ModelRepository

    out = Path(args.dir or settings.sampler.triton_repo)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    model = args.model.strip()
    if model:
        # A local path must be a pipeline folder; anything else (a hub id, a URL) is passed on as named.
        local = Path(model)
        if (local.is_absolute() or model.startswith(".")) and not local.is_dir():
            raise UsageError(f"--model: {model} is not a folder")
        settings = settings.replace(sampler_model=str(local.absolute()) if local.is_dir() else model)
    repository = ModelRepository(out)
    try:
        repository.render(settings)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    for version in repository.versions():
        print(f"{MODEL_NAME}\t{version.version}\t{version.uri}")
    return 0
