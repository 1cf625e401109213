"""LoRA training on the tiny AuraFlow transformer: only LoRA weights train, the output loads through
`AuraFlowPipeline.load_lora_weights` and changes the image, a zero-initialised LoRA leaves it bit-identical, and the
run publishes an adapter row."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline
from safetensors.torch import load_file

from pony_common.config import Settings
from services.trainer.events import EventWriter
from services.trainer.spec import parse_spec
from services.trainer.training.loop import run_training
from services.trainer.training.lora import LORA_WEIGHTS
from tests.trainer.conftest import tiny_spec


def lora_doc(manifest: Path, output: Path, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "output": str(output),
        "lora": {"enabled": True, "rank": 4, "alpha": 4.0, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
        "stages": [{"name": "style", "resolution": 32, "steps": 3, "batch_size": 2, "bucket_step": 16}],
        "optimizer": {"learning_rate": 5e-2},
        "checkpoint": {"every": 100},
        "ema": {"enabled": False},
    }
    return tiny_spec(manifest, **{**fields, **overrides})


def render(pipe: AuraFlowPipeline) -> np.ndarray:
    return pipe(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]


def base_pipe(settings: Settings) -> AuraFlowPipeline:
    pipe = AuraFlowPipeline.from_pretrained(settings.model_path("trainer"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_lora_trains_loads_through_load_lora_weights_and_changes_the_image(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    spec = parse_spec(lora_doc(manifest, tmp_path / "lora"))
    result = run_training(spec, model_settings, run_id="lora", events=EventWriter(io.StringIO()))
    weights = result.final_path / LORA_WEIGHTS
    assert weights.is_file() and not (result.final_path / "transformer").exists()  # adapter only, no base copy
    state = load_file(str(weights))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    assert all(k.startswith("transformer.") for k in state)
    assert any(t.abs().sum() > 0 for k, t in state.items() if ".lora_B." in k)  # B moved off its zero init

    pipe = base_pipe(model_settings)
    before = render(pipe)
    base_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(result.final_path)
    after = render(pipe)
    assert not np.array_equal(before, after)
    pipe.unload_lora_weights()
    assert all(torch.equal(base_weights[k], v) for k, v in pipe.transformer.state_dict().items())  # base untouched
    assert np.array_equal(render(pipe), before)


def test_a_zero_initialised_lora_leaves_the_image_bit_identical(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    # learning rate 0: peft's default init (B = 0) is what gets saved
    stages = [{"name": "style", "resolution": 32, "steps": 1, "batch_size": 2, "bucket_step": 16}]
    spec = parse_spec(lora_doc(manifest, tmp_path / "zero", optimizer={"learning_rate": 0.0}, stages=stages))
    result = run_training(spec, model_settings, run_id="zero", events=EventWriter(io.StringIO()))
    state = load_file(str(result.final_path / LORA_WEIGHTS))
    assert all(torch.count_nonzero(t) == 0 for k, t in state.items() if ".lora_B." in k)
    assert any(torch.count_nonzero(t) > 0 for k, t in state.items() if ".lora_A." in k)
    pipe = base_pipe(model_settings)
    before = render(pipe)
    pipe.load_lora_weights(result.final_path)
    assert np.array_equal(render(pipe), before)


def test_only_the_lora_weights_train_and_a_lora_run_resumes_exactly(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    doc = lora_doc(manifest, tmp_path / "whole", checkpoint={"every": 2, "keep": 3})
    whole = run_training(parse_spec(doc), model_settings, run_id="w", events=EventWriter(io.StringIO()))
    split = parse_spec({**doc, "output": str(tmp_path / "split")})
    run_training(split, model_settings, run_id="s", events=EventWriter(io.StringIO()), stop_after=2)
    ckpt = load_file(str(tmp_path / "split" / "checkpoints" / "step-00000002" / "transformer.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # the checkpoint holds the trainable (LoRA) weights only
    second = run_training(split, model_settings, run_id="s", events=EventWriter(io.StringIO()))
    assert second.resumed_from == 2
    assert second.losses == [(3, dict(whole.losses)[3])]
    a = load_file(str(whole.final_path / LORA_WEIGHTS))
    b = load_file(str(second.final_path / LORA_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_run_is_published_as_an_adapter(model_settings: Settings, manifest: Path, tmp_path: Path) -> None:
    from pony_common.catalog import catalog_for
    from pony_common.catalog.models import AdapterRow
    from services.trainer.publish import publish_run
    from services.trainer.store import RunStore

    doc = lora_doc(manifest, tmp_path / "pub")
    spec = parse_spec(doc)
    result = run_training(spec, model_settings, run_id="pub", events=EventWriter(io.StringIO()))
    catalog = catalog_for(model_settings.database_url)
    store = RunStore(catalog)
    store.create("pub", spec.name, spec.to_dict(), "local", "", "")
    settings = model_settings.replace(sampler_addr="")
    published = publish_run(settings, store, "pub", str(result.final_path))
    again = publish_run(settings, store, "pub", str(result.final_path))
    assert (again.name, again.version) == (published.name, published.version)  # once per run
    with catalog.session() as s:
        rows = s.query(AdapterRow).all()
        assert len(rows) == 1
        row = rows[0]
        assert (row.name, row.version, row.family, row.rank, row.alpha, row.run_id) == (
            spec.name,
            1,
            "pony_v7",
            4,
            4.0,
            "pub",
        )
        digest = hashlib.sha256((result.final_path / LORA_WEIGHTS).read_bytes()).hexdigest()
        assert row.sha256 == digest and row.uri == str(result.final_path)
        assert row.base_model_uri == model_settings.model_path("trainer")
    assert store.get("pub").model_version is None  # an adapter is not a new base model version


@pytest.mark.parametrize(
    ("lora", "field"),
    [({"enabled": True, "rank": 0}, "spec.lora.rank"), ({"enabled": True, "targets": []}, "spec.lora.targets")],
)
def test_a_bad_lora_spec_names_the_field(manifest: Path, lora: dict, field: str) -> None:
    from pony_common.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        parse_spec(tiny_spec(manifest, lora=lora))
    assert info.value.field == field


def test_a_local_lora_run_streams_validation_events_and_publishes_an_adapter(
    model_settings: Settings, manifest: Path
) -> None:
    """Through the controller and the local executor (the entrypoint as a subprocess), as `ponyctl train submit
    --local` runs it: validation images arrive as run events and the finished LoRA becomes an adapter row."""
    from pony_common.catalog import catalog_for
    from pony_common.catalog.models import AdapterRow, ModelVersionRow
    from services.trainer.local_run import train_locally

    settings = model_settings.replace(trainer_executor="local", sampler_addr="")
    doc = tiny_spec(
        manifest,
        name="style-lora",
        lora={"enabled": True, "rank": 2, "alpha": 2.0},
        stages=[{"name": "style", "resolution": 32, "steps": 2, "batch_size": 1, "bucket_step": 16}],
        checkpoint={"every": 100},
        ema={"enabled": False},
        validation={"prompts": ["a red square"], "seeds": [3], "every": 1, "steps": 2},
    )
    seen = []
    run = train_locally(settings, doc, on_event=lambda r, e: seen.append(e), timeout_s=600)
    assert run.state == "Succeeded", run.reason
    shown = [e for e in seen if e.kind == "log" and e.message.startswith("validation images")]
    assert [e.step for e in shown] == [1, 2]
    assert "validation/step-00000002/p00-s3.png" in shown[-1].message
    assert (Path(run.checkpoint_uri).parent / "validation" / "step-00000002" / "p00-s3.png").is_file()
    with catalog_for(settings.database_url).session() as s:
        (row,) = s.query(AdapterRow).all()
        assert (row.name, row.version, row.run_id, row.uri) == ("style-lora", 1, run.id, run.checkpoint_uri)
        assert s.query(ModelVersionRow).count() == 0  # no base model version for a LoRA
    assert run.model_version is None


def test_under_bf16_autocast_the_frozen_base_is_held_in_bf16_and_the_lora_in_fp32(
    model_settings: Settings, manifest: Path, tmp_path: Path
) -> None:
    from services.trainer.training.loop import Trainer

    doc = lora_doc(
        manifest,
        tmp_path / "bf16",
        autocast_on_cpu=True,
        stages=[{"name": "style", "resolution": 32, "steps": 2, "batch_size": 1, "bucket_step": 16}],
        validation={"prompts": ["a red square"], "seeds": [1], "steps": 2},
    )
    trainer = Trainer(parse_spec(doc), model_settings, run_id="bf16", events=EventWriter(io.StringIO()))
    result = trainer.run()
    dtypes = {p.dtype for n, p in trainer.transformer.named_parameters() if "lora_" not in n}
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.transformer.parameters() if p.requires_grad)
    assert all(np.isfinite(loss) for _, loss in result.losses)
    assert (tmp_path / "bf16" / "validation" / "step-00000002" / "p00-s1.png").is_file()
    assert all(t.dtype == torch.float32 for t in load_file(str(result.final_path / LORA_WEIGHTS)).values())
