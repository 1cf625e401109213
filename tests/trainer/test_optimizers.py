"""The 8-bit optimizer (bitsandbytes AdamW8bit on CPU): 8-bit moment states, it learns, and a run with it resumes."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pony_common.config import Settings
from services.trainer.events import EventWriter
from services.trainer.spec import OptimizerSpec, parse_spec
from services.trainer.training.loop import run_training
from services.trainer.training.optimizers import build_optimizer
from tests.trainer.conftest import tiny_spec


def test_adamw8bit_keeps_8_bit_states_and_learns() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(128, 64, generator=gen)
    layer = torch.nn.Linear(64, 128, bias=False)  # 8192 elements: above bitsandbytes' 4096 floor for 8-bit states
    torch.nn.init.zeros_(layer.weight)
    opt = build_optimizer(layer.parameters(), OptimizerSpec(kind="adamw8bit", learning_rate=5e-2))
    losses = []
    for _ in range(30):
        x = torch.randn(32, 64, generator=gen)
        loss = torch.nn.functional.mse_loss(layer(x), x @ target.T)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = opt.state[layer.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert state["state1"].shape == layer.weight.shape
    assert losses[-1] < 0.5 * losses[0]
    plain = build_optimizer(torch.nn.Linear(2, 2).parameters(), OptimizerSpec(kind="adamw"))
    assert type(plain) is torch.optim.AdamW


def test_a_run_with_adamw8bit_resumes_exactly(model_settings: Settings, manifest: Path, tmp_path: Path) -> None:
    doc = tiny_spec(
        manifest,
        optimizer={"kind": "adamw8bit", "learning_rate": 1e-3},
        stages=[{"name": "low", "resolution": 32, "steps": 3, "batch_size": 1, "bucket_step": 16}],
        checkpoint={"every": 100},
        ema={"enabled": False},
    )
    quiet = EventWriter(io.StringIO())
    whole = run_training(parse_spec({**doc, "output": str(tmp_path / "w")}), model_settings, run_id="w", events=quiet)
    split = parse_spec({**doc, "output": str(tmp_path / "s")})
    run_training(split, model_settings, run_id="s", events=EventWriter(io.StringIO()), stop_after=2)
    second = run_training(split, model_settings, run_id="s", events=EventWriter(io.StringIO()))
    assert second.resumed_from == 2
    assert second.losses == [(3, dict(whole.losses)[3])]
