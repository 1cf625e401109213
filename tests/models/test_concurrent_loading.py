"""Loading models from several threads at once (services in one process) leaves no parameter on the meta device:
transformers' loading patches process-wide state, so every platform loader takes one process-wide lock."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from pony_common.models.auraflow import load_pipeline
from services.captioner.model import load_vlm


def meta_parameters(*modules: torch.nn.Module) -> list[str]:
    return [name for m in modules for name, p in m.named_parameters() if p.is_meta]


def test_parallel_loads_of_different_models_are_all_complete(tiny_dirs: dict[str, Path]) -> None:
    broken: list[tuple[str, list[str]]] = []
    errors: list[BaseException] = []

    def pipelines() -> None:
        for _ in range(6):
            pipe = load_pipeline(str(tiny_dirs["auraflow"]))
            if bad := meta_parameters(pipe.transformer, pipe.text_encoder, pipe.vae):
                broken.append(("auraflow", bad[:3]))

    def vlms() -> None:
        for _ in range(6):
            model, _processor = load_vlm(str(tiny_dirs["vlm"]))
            if bad := meta_parameters(model):
                broken.append(("vlm", bad[:3]))

    def run(fn) -> None:  # type: ignore[no-untyped-def]
        try:
            fn()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in (pipelines, vlms, pipelines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert not broken, broken
