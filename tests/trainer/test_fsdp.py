"""FSDP2 on two gloo processes on the tiny AuraFlow model: the loss falls, a sharded (DCP) checkpoint resumes exactly,
validation runs collectively, and the consolidated weights load into AuraFlowPipeline."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import AuraFlowPipeline
from safetensors.torch import load_file

from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.trainer.events import EventWriter
from services.trainer.spec import parse_spec
from tests.conftest import free_port
from tests.trainer.conftest import tiny_spec

WORLD = 2
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


def fsdp_doc(manifest: Path, **overrides: Any) -> dict[str, Any]:
    return tiny_spec(
        manifest,
        sharding={"strategy": "fsdp"},
        mixed_precision="bf16",
        flow={"weighting": "uniform"},
        stages=[
            {"name": "low", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16, "shift": "auto"},
            {"name": "high", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16, "shift": 3.0},
        ],
        optimizer={"learning_rate": 3e-3},
        checkpoint={"every": 2, "keep": 5},
        ema={"enabled": True, "decay": 0.5},
        validation={"prompts": ["a red square"], "seeds": [1], "steps": 2, "guidance_scale": 1.0},
        **overrides,
    )


def _rank_main(rank: int, port: int, settings: Settings, doc: dict[str, Any], out: str) -> None:
    """One rank: an uninterrupted run, then the same spec stopped after step 4 and resumed (one process group)."""
    from services.trainer.training.loop import DistInfo, run_training

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=10)
    )
    try:
        info = DistInfo(rank=rank, local_rank=rank, world_size=WORLD)
        results: dict[str, Any] = {}
        for key, output, stop in (("whole", "whole", None), ("first", "split", 4), ("second", "split", None)):
            events = EventWriter(io.StringIO(), enabled=rank == 0)
            spec = parse_spec({**doc, "output": str(Path(out) / output)})
            result = run_training(spec, settings, run_id=output, dist_info=info, events=events, stop_after=stop)
            results[key] = {"losses": result.losses, "resumed_from": result.resumed_from, "events": events.events}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> tuple[Path, list[dict[str, Any]]]:
    from tests.trainer.conftest import make_manifest

    root = tmp_path_factory.mktemp("fsdp")
    settings = Settings.from_env({}, state_dir=str(root / "state")).replace(models_dir=str(tiny_models))
    from pony_common.access import export_root

    manifest = make_manifest(Path(export_root(settings)) / "data")
    out = root / "runs"
    out.mkdir()
    mp.start_processes(
        _rank_main,
        args=(free_port(), settings, fsdp_doc(manifest), str(out)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_fsdp_trains_and_the_loss_falls(fsdp_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = fsdp_runs
    losses = [loss for _, loss in ranks[0]["whole"]["losses"]]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    # both ranks see the same (all-reduced) loss
    assert ranks[0]["whole"]["losses"] == ranks[1]["whole"]["losses"]
    stages = [e for e in ranks[0]["whole"]["events"] if e["kind"] == "stage"]
    assert stages[1]["shift"] == 3.0 and 0.5 < stages[0]["shift"] < 3.0  # "auto" at 32 px, then the number
    start = ranks[0]["whole"]["events"][0]
    assert (start["strategy"], start["world_size"], start["backend"]) == ("fsdp", 2, "gloo")


def test_a_sharded_checkpoint_resumes_exactly(fsdp_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    out, ranks = fsdp_runs
    ckpt = out / "split" / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "state.json").read_text())["format"] == "dcp"
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == WORLD
    assert sorted(p.name for p in ckpt.glob("rng-rank*.pt")) == ["rng-rank00000.pt", "rng-rank00001.pt"]
    for rank in ranks:
        assert rank["second"]["resumed_from"] == 4
        whole = {step: loss for step, loss in rank["whole"]["losses"]}
        assert [s for s, _ in rank["second"]["losses"]] == [5, 6]
        assert all(loss == whole[step] for step, loss in rank["second"]["losses"])
    a = load_file(str(out / "whole" / "final" / WEIGHTS))
    b = load_file(str(out / "split" / "final" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_consolidated_weights_load_into_auraflow_pipeline(
    fsdp_runs: tuple[Path, list[dict[str, Any]]], tiny_models: Path
) -> None:
    out, _ = fsdp_runs
    pipe = AuraFlowPipeline.from_pretrained(out / "whole" / "final")
    pipe.set_progress_bar_config(disable=True)
    weights = pipe.transformer.state_dict()
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights, not the bf16 compute copy
    base = load_file(str(tiny_models / "auraflow" / WEIGHTS))
    assert base.keys() == weights.keys()
    assert any(not torch.equal(base[k], weights[k]) for k in base)  # trained
    image = pipe(
        "a red square", height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np"
    ).images[0]
    assert image.shape == (32, 32, 3)


def test_validation_runs_on_every_rank_and_rank_zero_writes(fsdp_runs: tuple[Path, list[dict[str, Any]]]) -> None:
    out, ranks = fsdp_runs
    events = [e for e in ranks[0]["whole"]["events"] if e["kind"] == "validation"]
    assert [(e["step"], e["stage"]) for e in events] == [(3, "low"), (6, "high")]  # every = 0: stage ends only
    for event in events:
        assert all((out / "whole" / path).is_file() for path in event["images"])
    assert ranks[1]["whole"]["events"] == []  # rank 1 emits nothing


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"lora": {"enabled": True}}, "spec.lora.enabled"),
        ({"optimizer": {"kind": "adamw8bit"}}, "spec.optimizer.kind"),
    ],
)
def test_unsupported_fsdp_combinations_name_the_field(manifest: Path, change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec({**tiny_spec(manifest, sharding={"strategy": "fsdp"}), **change})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("sharding", "field"),
    [
        ({"strategy": "fsdp"}, "spec.sharding.strategy"),  # not under torchrun
        ({"strategy": "fsdp", "cpu_offload": True}, "spec.sharding.cpu_offload"),  # PONY_DEVICE=cpu
    ],
)
def test_an_fsdp_run_that_cannot_start_here_names_the_field(
    model_settings: Settings, manifest: Path, sharding: dict, field: str
) -> None:
    from services.trainer.training.loop import run_training

    spec = parse_spec(tiny_spec(manifest, sharding=sharding))
    with pytest.raises(InvalidArgument) as info:
        run_training(spec, model_settings, run_id="solo", events=EventWriter(io.StringIO()))
    assert info.value.field == field


def test_the_indexed_job_renders_an_fsdp_run_through_torchrun(settings: Settings) -> None:
    from services.trainer.render import render_run
    from services.trainer.spec import load_spec

    production = load_spec(Path(__file__).resolve().parents[2] / "services/trainer/specs/v7-production.yaml")
    assert production.sharding.strategy == "fsdp" and production.mixed_precision == "bf16"
    cluster = settings.replace(trainer_namespace="pony-train", models_dir="/models", trainer_pool_label="pony.ai/pool")
    job = render_run(production, cluster, "v7-ft-0a1b2c3d").job
    assert job["spec"]["completionMode"] == "Indexed"  # several nodes: one torchrun per node
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][0] == "torchrun" and "--node-rank=$(JOB_COMPLETION_INDEX)" in container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_a_checkpoint_of_the_other_strategy_is_refused_by_name(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    from services.trainer.training.loop import run_training

    sharded = tmp_path / "out" / "checkpoints" / "step-00000001"
    sharded.mkdir(parents=True)
    (sharded / "state.json").write_text(json.dumps({"step": 1, "format": "dcp"}))
    spec = parse_spec(tiny_spec(manifest, output=str(tmp_path / "out")))  # ddp, resume: auto
    with pytest.raises(InvalidArgument) as info:
        run_training(spec, model_settings, run_id="mixed", events=EventWriter(io.StringIO()))
    assert info.value.field == "spec.resume" and "fsdp" in info.value.message
