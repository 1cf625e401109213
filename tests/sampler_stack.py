"""The sampler stack every test that needs one shares (one per session, registered for the whole suite by
tests/conftest.py): tritonserver (from the nvidia-pytriton wheel)
serving both model families from the tiny models (AuraFlow as `pony_v7`, the default; SDXL as `pony_v6`), the
safety service, and the sampler with a bearer token."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from pony_common.config import Settings
from pony_common.grpc.client import channel
from pony_common.grpc.server import RunningServer
from pony_common.testing import ServerLoop
from services.sampler.model import SamplerModel
from tests.conftest import free_port

TOKEN = "sampler-test-token"
SIZE = 64
STEPS = 4


@dataclass
class SamplerStack:
    settings: Settings  # client-side: the sampler's address and the token
    model: SamplerModel
    servers: ServerLoop

    @property
    def addr(self) -> str:
        return self.settings.sampler_addr

    def channel(self, token: str | None = TOKEN) -> grpc.Channel:
        return channel(self.settings.replace(auth_token=token or ""), self.addr)

    def start_sampler(self, settings: Settings, model: SamplerModel | None = None) -> RunningServer:
        """Another sampler server in the same loop (e.g. other safety settings over the same Triton)."""
        from services.sampler.app import create_service

        return self.servers.start(settings, create_service(settings, model=model))

    def stop_server(self, running: RunningServer) -> None:
        self.servers.stop(running)


def stack_settings(state: Path, models: Path) -> Settings:
    return Settings.from_env(
        {},
        state_dir=str(state),
        models_dir=str(models),
        auth_token=TOKEN,
        triton_http_port=free_port(),
        triton_grpc_port=free_port(),
        triton_metrics_port=free_port(),
        sampler_default_width=SIZE,
        sampler_default_height=SIZE,
        sampler_default_steps=STEPS,
        sampler_families=("pony_v7", "pony_v6"),
        sampler_default_model="pony_v7",
        sampler_v6_default_width=SIZE,
        sampler_v6_default_height=SIZE,
        sampler_v6_default_steps=STEPS,
        sampler_max_batch_size=4,
        sampler_batch_delay_us=50_000,
        log_json=False,
    )


@pytest.fixture(scope="session")
def sampler_stack(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamplerStack]:
    from services.safety.app import create_service as create_safety
    from services.sampler.app import create_service as create_sampler

    settings = stack_settings(tmp_path_factory.mktemp("sampler") / "state", tiny_models)
    model = SamplerModel(settings)
    try:
        with ServerLoop() as servers:
            safety = servers.start(settings, create_safety(settings))
            settings = settings.replace(safety_addr=f"127.0.0.1:{safety.port}")
            sampler = servers.start(settings, create_sampler(settings, model=model))
            settings = settings.replace(sampler_addr=f"127.0.0.1:{sampler.port}")
            yield SamplerStack(settings, model, servers)
    finally:
        model.teardown()


def pixels(png: bytes) -> np.ndarray:
    """A PNG's RGB pixels."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def direct(pipe: Any, resp: Any, seed: int) -> np.ndarray:
    """What the family's diffusers pipeline (AuraFlowPipeline, StableDiffusionXLPipeline) gives when called directly
    with a GenerateResponse's assembled prompt, seed and settings."""
    import torch

    image = pipe(
        resp.prompt,
        negative_prompt=resp.negative_prompt,
        width=resp.width,
        height=resp.height,
        num_inference_steps=resp.steps,
        guidance_scale=resp.guidance,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return np.asarray(image)
