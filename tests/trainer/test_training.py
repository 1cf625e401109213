"""The training entrypoint on the tiny AuraFlow model on CPU: it learns, resumes exactly, caches latents once,
and writes a pipeline the sampler can load."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

from pony_common.blobs import BlobStore
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from services.trainer.events import EventWriter, parse_event
from services.trainer.spec import CaptionSpec, FlowSpec, parse_spec
from services.trainer.training.buckets import make_buckets, nearest_bucket
from services.trainer.training.captions import training_prompt
from services.trainer.training.flow import flow_batch, training_scheduler
from services.trainer.training.loop import run_training
from services.trainer.training.manifest import read_manifest
from tests.trainer.conftest import tiny_spec, write_spec

ROOT = Path(__file__).resolve().parents[2]


def quiet() -> EventWriter:
    return EventWriter(io.StringIO())


def test_loss_falls_when_overfitting_a_tiny_set(model_settings: Settings, manifest: Path) -> None:
    spec = parse_spec(
        tiny_spec(
            manifest,
            stages=[{"name": "low", "resolution": 32, "steps": 40, "batch_size": 4, "bucket_step": 16}],
            optimizer={"learning_rate": 3e-3},
            flow={"weighting": "uniform"},
            checkpoint={"every": 100},
            ema={"enabled": False},
        )
    )
    result = run_training(spec, model_settings, run_id="overfit", events=quiet())
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def test_bf16_autocast_on_cpu_with_gradient_accumulation_trains(model_settings: Settings, manifest: Path) -> None:
    spec = parse_spec(
        tiny_spec(
            manifest,
            autocast_on_cpu=True,
            grad_accum=2,
            gradient_checkpointing=False,
            stages=[{"name": "low", "resolution": 32, "steps": 2, "batch_size": 1, "bucket_step": 16}],
            checkpoint={"every": 100},
        )
    )
    result = run_training(spec, model_settings, run_id="bf16", events=quiet())
    assert [s for s, _ in result.losses] == [1, 2]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    weights = load_file(str(result.final_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay float32


def test_a_resumed_run_gives_the_same_next_step_loss_as_an_uninterrupted_one(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    doc = tiny_spec(manifest)  # 3 steps at 32 px, 3 at 64 px, EMA on, checkpoint every 3
    whole = run_training(
        parse_spec({**doc, "output": str(tmp_path / "whole")}), model_settings, run_id="whole", events=quiet()
    )
    split = parse_spec({**doc, "output": str(tmp_path / "split")})
    first = run_training(split, model_settings, run_id="split", events=quiet(), stop_after=4)
    assert first.step == 4 and first.final_path is None
    assert (tmp_path / "split" / "checkpoints" / "step-00000004" / "optimizer.pt").exists()
    second = run_training(split, model_settings, run_id="split", events=quiet())
    assert second.resumed_from == 4
    assert [s for s, _ in second.losses] == [5, 6]
    expected = dict(whole.losses)
    assert second.losses[0][1] == pytest.approx(expected[5], abs=1e-6)
    assert second.losses[1][1] == pytest.approx(expected[6], abs=1e-6)
    a = load_file(str(whole.final_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(second.final_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latents_are_encoded_once_across_two_runs(model_settings: Settings, manifest: Path, tmp_path: Path) -> None:
    doc = tiny_spec(manifest, checkpoint={"every": 100})
    one = run_training(parse_spec({**doc, "output": str(tmp_path / "a")}), model_settings, run_id="a", events=quiet())
    # 4 images x 2 stages (each stage has its own buckets)
    assert (one.latents_encoded, one.latents_reused) == (8, 0)
    keys = list(BlobStore(model_settings.blob_url).list("latents"))
    assert len(keys) == 8
    events = EventWriter(io.StringIO())
    two = run_training(parse_spec({**doc, "output": str(tmp_path / "b")}), model_settings, run_id="b", events=events)
    assert (two.latents_encoded, two.latents_reused) == (0, 8)
    assert list(BlobStore(model_settings.blob_url).list("latents")) == keys
    stages = [e for e in events.events if e["kind"] == "stage"]
    assert [e["latents_encoded"] for e in stages] == [0, 0]


def test_the_final_pipeline_loads_and_generates(model_settings: Settings, manifest: Path, tmp_path: Path) -> None:
    spec = parse_spec({**tiny_spec(manifest), "output": str(tmp_path / "out")})
    result = run_training(spec, model_settings, run_id="final", events=quiet())
    assert result.final_path == tmp_path / "out" / "final"
    pipe = AuraFlowPipeline.from_pretrained(result.final_path)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    # with EMA on, the exported weights are the EMA weights of the last checkpoint
    ema = load_file(str(tmp_path / "out" / "checkpoints" / "step-00000006" / "ema.safetensors"))
    exported = pipe.transformer.state_dict()
    assert all(torch.equal(ema[k], exported[k]) for k in ema)


def test_the_entrypoint_prints_json_step_events(model_settings: Settings, manifest: Path, tmp_path: Path) -> None:
    doc = tiny_spec(
        manifest,
        output=str(tmp_path / "cli"),
        stages=[{"name": "low", "resolution": 32, "steps": 2, "batch_size": 1, "bucket_step": 16}],
    )
    spec_path = write_spec(tmp_path / "spec.yaml", doc)
    env = {
        "PATH": "/usr/bin:/bin",
        "PONY_STATE_DIR": model_settings.state_dir,
        "PONY_MODELS_DIR": model_settings.models_dir,
        "PONY_BLOB_URL": model_settings.blob_url,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer.training.train", "--spec", str(spec_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [e for e in map(parse_event, proc.stdout.splitlines()) if e]
    assert [e["kind"] for e in events] == ["start", "stage", "step", "step", "checkpoint", "done"]
    assert all(isinstance(e["loss"], float) for e in events if e["kind"] == "step")
    assert events[-1]["output"] == str(tmp_path / "cli" / "final")
    # every stdout line is an event: logs go to stderr
    assert all(json.loads(line) for line in proc.stdout.splitlines())

    bad = write_spec(tmp_path / "bad.yaml", {**doc, "stages": [{"resolution": 30, "steps": 1}]})
    proc = subprocess.run(
        [sys.executable, "-m", "services.trainer.training.train", "--spec", str(bad)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "spec.stages[0]" in proc.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Bad Name"}, "spec.name"),
        ({"manifest": None}, "spec.manifest"),
        ({"stages": []}, "spec.stages"),
        ({"stages": [{"resolution": 64}]}, "spec.stages[0].steps"),
        ({"stages": [{"resolution": 72, "steps": 1, "bucket_step": 16}]}, "spec.stages[0].resolution"),
        ({"grad_accum": 0}, "spec.grad_accum"),
        ({"mixed_precision": "fp8"}, "spec.mixed_precision"),
        ({"ema": {"decay": 2}}, "spec.ema.decay"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"captions": {"kinds": ["short", "poem"]}}, "spec.captions.kinds[1]"),
        ({"learning_rate": 1.0}, "spec.learning_rate"),
    ],
)
def test_a_bad_spec_names_the_field(manifest: Path, change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_spec({**tiny_spec(manifest), **change})
    assert info.value.field == field


def test_the_spec_round_trips_through_yaml(manifest: Path) -> None:
    from services.trainer.spec import parse_spec_text

    spec = parse_spec(tiny_spec(manifest))
    assert parse_spec_text(spec.to_yaml()) == spec
    assert spec.total_steps == 6


def test_the_manifest_reads_back_in_the_export_format(manifest: Path) -> None:
    items = read_manifest(manifest)
    assert len(items) == 4
    assert items[0].captions["short"] == "a red square"
    assert items[0].special_tags[0] == "score_9"
    assert Path(items[0].image_uri).is_absolute() and Path(items[0].image_uri).exists()


def test_a_manifest_in_the_curation_export_schema_reads(manifest: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pony_common.manifest import SCHEMA

    ours = pq.read_table(manifest).to_pylist()
    rows = [{f.name: row.get(f.name) for f in SCHEMA} for row in ours]
    for row in rows:
        row["image_uri"] = str(manifest.parent / row["image_uri"])  # the export writes absolute paths
    path = tmp_path / "export" / "manifest.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({f.name: [r[f.name] for r in rows] for f in SCHEMA}, schema=SCHEMA), path)
    items = read_manifest(path)
    assert [i.image_id for i in items] == [r["image_id"] for r in ours]
    assert items[2].captions["long"].startswith("a plain green square")


def test_buckets_cover_the_area_in_multiples_of_the_step() -> None:
    buckets = make_buckets(64, 16)
    assert all(b.width % 16 == 0 and b.height % 16 == 0 and b.width * b.height <= 64 * 64 for b in buckets)
    assert {(64, 64), (80, 48), (48, 80)} <= {(b.width, b.height) for b in buckets}
    assert all(0.5 <= b.aspect <= 2.0 for b in buckets)
    assert nearest_bucket(1000, 1000, buckets).key == "64x64"
    assert nearest_bucket(1600, 900, buckets).aspect > 1.3
    big = make_buckets(1024, 64)
    assert (1024, 1024) in {(b.width, b.height) for b in big}
    assert all(b.width * b.height >= 0.85 * 1024 * 1024 for b in big)


def test_prompts_keep_special_tags_first_and_shuffle_and_drop_content_tags(manifest: Path) -> None:
    item = read_manifest(manifest)[1]
    spec = CaptionSpec(prompt_probability=0.0, empty_probability=0.0, tag_dropout=0.5)
    rng = random.Random(0)
    prompts = [training_prompt(item, spec, rng) for _ in range(200)]
    special = ", ".join(item.special_tags)
    assert all(p.startswith(special + ", ") for p in prompts)
    captions = {p.removeprefix(special + ", ").split(", ")[0] for p in prompts}
    assert len(captions) >= 3  # several caption kinds sampled (the style caption has no comma)
    tails = {tuple(p.split(", ")[len(item.special_tags) + 1 :]) for p in prompts}
    assert any(len(t) < len(item.tags) for t in tails)  # some tags dropped
    assert any(len(t) == len(item.tags) and list(t) != list(item.tags) for t in tails)  # order shuffled
    empty = CaptionSpec(empty_probability=1.0)
    assert training_prompt(item, empty, rng) == ""
    assembled = CaptionSpec(empty_probability=0.0, prompt_probability=1.0)
    assert training_prompt(item, assembled, rng) == item.prompt


def test_the_flow_targets_match_the_scheduler() -> None:
    base = FlowMatchEulerDiscreteScheduler(shift=1.73)
    sched = training_scheduler(base, FlowSpec(weighting="uniform"))
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, 2, 2, generator=gen)
    fb = flow_batch(x0, sched, FlowSpec(weighting="uniform"), gen)
    # σ and t are rows of the scheduler's own table, with the shift applied: σ = shift·s / (1 + (shift-1)·s)
    s = fb.sigmas
    assert torch.allclose(fb.timesteps / 1000, s)
    table = set(sched.sigmas.tolist())
    assert all(v in table for v in s.tolist())
    unshifted = s / (1.73 - 0.73 * s)
    assert torch.allclose(1.73 * unshifted / (1 + 0.73 * unshifted), s, atol=1e-6)
    # x_t = (1-σ)x0 + σ·noise and the target is noise - x0: an Euler step to σ=0 with it recovers x0
    sig = s.view(-1, 1, 1, 1)
    assert torch.allclose(fb.noisy + (0 - sig) * fb.target, x0, atol=1e-5)
    # the same update the scheduler's step() makes: x_prev = x_t + (σ_next - σ)·v
    # (set_timesteps shifts the sigmas it is given, so it gets the unshifted value)
    step_sched = FlowMatchEulerDiscreteScheduler(shift=1.73)
    step_sched.set_timesteps(sigmas=[float(unshifted[0])])
    assert step_sched.sigmas[0].item() == pytest.approx(float(s[0]), abs=1e-6)
    prev = step_sched.step(fb.target[:1], step_sched.timesteps[0], fb.noisy[:1]).prev_sample
    assert torch.allclose(prev, x0[:1], atol=1e-4)
    shifted = training_scheduler(base, FlowSpec(shift=3.0))
    assert shifted.config.shift == 3.0 and not torch.allclose(shifted.sigmas, sched.sigmas)
