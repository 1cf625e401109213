"""The memory plan: exact counts from configs on the meta device, FSDP sharding, LoRA trainables as peft counts
them, activations measured per stage, and the refusal of a spec that cannot fit (CLI exit 1, SubmitRun
INVALID_ARGUMENT through the real controller), bad input exit 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from diffusers import AuraFlowTransformer2DModel, AutoencoderKL
from diffusers.models.transformers.auraflow_transformer_2d import find_multiple
from peft import LoraConfig
from transformers import UMT5EncoderModel

from pony_common.access import export_root
from pony_common.cli.main import main
from pony_common.config import Settings
from pony_common.models.auraflow import _FULL
from pony_common.testing import serve
from services.trainer.app import create_service
from services.trainer.client import TrainerClient
from services.trainer.plan import (
    BUILT_IN,
    GIB,
    V7_TRANSFORMER_CONFIG,
    activation_profile,
    param_counts,
    plan_memory,
    read_configs,
    refusal,
)
from services.trainer.service import TrainerService
from services.trainer.spec import LoraSpec, parse_spec
from tests.trainer.conftest import tiny_spec, write_spec

SHARDED = ("master params (fp32)", "gradients (fp32)", "optimizer states (adamw)", "EMA (fp32)")


def v7_spec(**overrides) -> dict:
    """A full fine-tune of the V7 transformer at 512 then 1024 px, on the training GPU pool."""
    doc = {
        "name": "v7-plan",
        "manifest": "s3://bucket/manifest.parquet",
        "base_model": "/models/auraflow",  # a path inside the pod: not readable here, so the built-in config
        "stages": [
            {"name": "low", "resolution": 512, "steps": 10, "batch_size": 2},
            {"name": "high", "resolution": 1024, "steps": 10, "batch_size": 1},
        ],
        "ema": {"enabled": True},
        "sharding": {"strategy": "fsdp"},
        "resources": {"nodes": 1, "processes_per_node": 8, "gpus_per_node": 8},
    }
    doc.update(overrides)
    return doc


def terms(plan) -> dict[str, tuple[int, int]]:
    return {t.name: (t.gpu, t.host) for t in plan.terms}


def v7_formula(c: dict) -> int:
    """AuraFlowTransformer2DModel's parameters written out from its layers (no model involved)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    f = find_multiple(int(2 * 4 * d / 3), 256)  # SwiGLU hidden size
    joint = 2 * 6 * d * d + 8 * d * d + 2 * 3 * d * f  # 2 AdaLN-Zero, q/k/v/out x2, 2 feed-forwards
    single = 6 * d * d + 4 * d * d + 3 * d * f
    patch = c["patch_size"] ** 2
    root = (
        patch * c["in_channels"] * d + d  # patch projection (with bias)
        + c["pos_embed_max_size"] * d  # position table
        + c["joint_attention_dim"] * c["caption_projection_dim"]  # context embedder
        + 256 * d + d + d * d + d  # timestep MLP
        + 2 * d * d + d * patch * c["out_channels"]  # final AdaLN and projection
        + 8 * d  # register tokens
    )  # fmt: skip
    return c["num_mmdit_layers"] * joint + c["num_single_dit_layers"] * single + root


def test_counts_on_the_tiny_config_equal_the_real_models(tiny_models: Path) -> None:
    configs = read_configs(str(tiny_models / "auraflow"))
    assert configs.source == str(tiny_models / "auraflow")
    counts = param_counts(configs)
    real = AuraFlowTransformer2DModel.from_pretrained(tiny_models / "auraflow" / "transformer")
    assert counts.total == counts.trainable == sum(p.numel() for p in real.parameters())
    blocks = [*real.joint_transformer_blocks, *real.single_transformer_blocks]
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    assert counts.largest_block == max(sizes) and counts.root == counts.total - sum(sizes)
    encoder = UMT5EncoderModel.from_pretrained(tiny_models / "auraflow" / "text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_models / "auraflow" / "vae")
    assert counts.text_encoder == sum(p.numel() for p in encoder.parameters())
    assert counts.vae == sum(p.numel() for p in vae.parameters())


def test_the_v7_count_from_the_built_in_config() -> None:
    configs = read_configs("/no/such/model")
    assert configs.source == BUILT_IN
    # the built-in config is the full size the rest of the platform builds (pony_common/models/auraflow.py)
    with torch.device("meta"):
        full = AuraFlowTransformer2DModel(**_FULL["transformer"])
    assert {k: full.config[k] for k in V7_TRANSFORMER_CONFIG} == V7_TRANSFORMER_CONFIG
    counts = param_counts(configs)
    assert counts.total == v7_formula(V7_TRANSFORMER_CONFIG) == sum(p.numel() for p in full.parameters())
    assert round(counts.total / 1e9, 2) == 6.86  # 6.83B with the 1024-entry position table of AuraFlow 0.1
    smaller = dict(V7_TRANSFORMER_CONFIG, pos_embed_max_size=1024)
    assert round(v7_formula(smaller) / 1e9, 2) == 6.83
    assert counts.text_encoder > 1e9 and counts.vae < 1e8


def test_fsdp_divides_the_state_by_the_world_size_and_ddp_does_not(tiny_models: Path) -> None:
    base = str(tiny_models / "auraflow")
    spec = parse_spec(v7_spec(stages=[{"resolution": 64, "steps": 1, "bucket_step": 16}]))
    one, four = terms(plan_memory(spec, 1, base)), terms(plan_memory(spec, 4, base))
    for name in SHARDED:
        assert one[name][0] > 0 and abs(one[name][0] - 4 * four[name][0]) < 4
    offloaded = terms(plan_memory(spec.replace(sharding=replace(spec.sharding, cpu_offload=True)), 4, base))
    for name in SHARDED:
        assert offloaded[name] == (0, four[name][0])
    ddp = spec.replace(sharding=replace(spec.sharding, strategy="ddp"))
    ddp_one, ddp_four = terms(plan_memory(ddp, 1, base)), terms(plan_memory(ddp, 4, base))
    for name in SHARDED:
        assert ddp_four[name] == ddp_one[name] == one[name]
    assert "DDP reducer buckets (fp32)" in ddp_four and "DDP reducer buckets (fp32)" not in ddp_one
    assert plan_memory(spec, 4, base).gpu_bytes < plan_memory(ddp, 4, base).gpu_bytes


def test_lora_trainables_equal_peft_on_the_tiny_model(tiny_models: Path) -> None:
    configs = read_configs(str(tiny_models / "auraflow"))
    for lora in (LoraSpec(enabled=True, rank=4), LoraSpec(enabled=True, rank=3, targets=("add_q_proj", "ff.linear_1"))):
        model = AuraFlowTransformer2DModel.from_pretrained(tiny_models / "auraflow" / "transformer")
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.targets)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = param_counts(configs, lora)
        assert counts.trainable == counts.lora == trainable > 0
        assert counts.total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_activations_grow_with_tokens_and_batch_and_checkpointing_keeps_less() -> None:
    configs = read_configs("")
    low = activation_profile(configs, 512, 264, torch.bfloat16, None)
    high = activation_profile(configs, 1024, 264, torch.bfloat16, None)
    tokens_low, tokens_high = 32 * 32 + 264, 64 * 64 + 264
    # flash attention keeps no tokens x tokens matrix: a block's saved bytes grow with the tokens, not their square
    ratio = max(high.per_block) / max(low.per_block)
    assert 0.9 * tokens_high / tokens_low < ratio < 1.1 * tokens_high / tokens_low
    d = V7_TRANSFORMER_CONFIG["num_attention_heads"] * V7_TRANSFORMER_CONFIG["attention_head_dim"]
    assert high.block_inputs[-1] >= tokens_high * d * 2  # a single block takes all tokens, bf16
    assert high.bytes(2, True) == 2 * high.bytes(1, True)
    assert high.bytes(1, True) < high.bytes(1, False) / 5
    fp32 = activation_profile(configs, 512, 264, torch.float32, None)
    assert max(fp32.per_block) > max(low.per_block)


def test_the_reference_plans_fit_and_the_refusal_names_the_field() -> None:
    full = parse_spec(v7_spec())
    plan = plan_memory(full)
    assert plan.world_size == 8 and plan.counts.total > 6.8e9
    assert plan.gpu_bytes <= 70e9  # the target per rank on 8 x 80 GB
    assert refusal(plan, full, 80, 0.1) is None
    assert plan.deciding_stage == 1 and "activations high (1024px)" in plan.table()
    ddp = full.replace(sharding=replace(full.sharding, strategy="ddp"))
    refused = refusal(plan_memory(ddp), ddp, 80, 0.1)
    assert refused is not None and refused.field == "spec.sharding.strategy"
    assert "GiB per GPU" in refused.message and "72.0 GiB usable" in refused.message
    big_batch = parse_spec(
        v7_spec(stages=[{"resolution": 512, "steps": 1}, {"resolution": 1024, "steps": 1, "batch_size": 256}])
    )
    refused = refusal(plan_memory(big_batch), big_batch, 80, 0.1)
    assert refused is not None and refused.field == "spec.stages[1].batch_size"
    no_ckpt = parse_spec(
        v7_spec(gradient_checkpointing=False, stages=[{"resolution": 1024, "steps": 1, "batch_size": 4}])
    )
    refused = refusal(plan_memory(no_ckpt), no_ckpt, 80, 0.1)
    assert refused is not None and refused.field == "spec.gradient_checkpointing"
    lora = parse_spec(
        v7_spec(
            stages=[{"resolution": 1024, "steps": 1}],
            ema={"enabled": False},
            sharding={"strategy": "ddp"},
            lora={"enabled": True, "rank": 16},
            resources={"gpus_per_node": 1},
        )
    )
    lora_plan = plan_memory(lora)
    assert lora_plan.counts.trainable == lora_plan.counts.lora < 0.01 * lora_plan.counts.total
    assert lora_plan.gpu_bytes < plan_memory(full, 1).gpu_bytes / 2
    assert refusal(lora_plan, lora, 24, 0.1) is None  # a style LoRA fits one 24 GB GPU (bf16 frozen base)
    refused = refusal(lora_plan, lora, 8, 0.1)  # the frozen model alone is more than an 8 GiB GPU
    assert refused is not None and refused.field == "spec.resources.pool"
    refused = refusal(plan_memory(full, 1), full, 80, 0.1)
    assert refused is not None and refused.field == "spec.sharding.cpu_offload"


@pytest.fixture
def cli_env(model_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in {
        "PONY_STATE_DIR": model_settings.state_dir,
        "PONY_MODELS_DIR": model_settings.models_dir,
        "PONY_LOG_JSON": "false",
        "PONY_LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def test_ponyctl_train_plan_exits_0_when_it_fits_and_1_when_not(cli_env: Settings, tmp_path: Path, capsys) -> None:
    fits = write_spec(tmp_path / "fits.yaml", v7_spec())
    assert main(["train", "plan", str(fits), "--gpus", "8", "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "fsdp on 8 GPUs" in out and "master params (fp32)" in out and "total per rank" in out
    assert out.splitlines()[-1].startswith("fits: ")
    assert main(["train", "plan", str(fits), "--gpus", "1", "--gpu-memory-gib", "80"]) == 1
    out = capsys.readouterr().out
    assert "total per rank" in out
    last = out.splitlines()[-1]
    assert last.startswith("spec.sharding.cpu_offload: the run does not fit") and "GiB per GPU" in last
    # the spec's own base model config is planned when it is readable: the tiny model fits anywhere
    tiny = write_spec(tmp_path / "tiny.yaml", v7_spec(stages=[{"resolution": 64, "steps": 1, "bucket_step": 16}]))
    assert main(["train", "plan", str(tiny), "--base-model", f"{cli_env.models_dir}/auraflow"]) == 0
    assert f"config: {cli_env.models_dir}/auraflow" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(cli_env: Settings, tmp_path: Path, capsys) -> None:
    fits = write_spec(tmp_path / "fits.yaml", v7_spec())
    too_big = write_spec(tmp_path / "big.yaml", v7_spec(stages=[{"resolution": 2048, "steps": 1}]))
    cases = [
        (["train", "plan", str(tmp_path / "missing.yaml")], "does not exist"),
        (["train", "plan", str(fits), "--gpus", "0"], "--gpus"),
        (["train", "plan", str(fits), "--gpu-memory-gib", "lots"], "--gpu-memory-gib"),
        (["train", "plan", str(fits), "--base-model", str(tmp_path)], "transformer/config.json"),
        (["train", "plan", str(too_big)], "spec.stages[0].resolution"),
    ]
    for argv, reason in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and reason in err, err


@pytest.fixture
def controller_settings(model_settings: Settings) -> Iterator[Settings]:
    """A real TrainerController (local executor) on a free port; settings whose trainer_addr points at it."""
    settings = model_settings.replace(sampler_addr="", trainer_gpu_memory_gib=80.0)
    with serve(settings, create_service(settings, TrainerService(settings)), ready_timeout=30) as served:
        yield settings.replace(trainer_addr=served.address)


def test_submit_refuses_a_gpu_spec_that_cannot_fit(controller_settings: Settings, manifest: Path) -> None:
    # a base model folder the controller may read, holding the real V7 transformer config
    base = Path(export_root(controller_settings)) / "v7-config"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps(V7_TRANSFORMER_CONFIG))
    client = TrainerClient(controller_settings)
    ddp = v7_spec(manifest=str(manifest), base_model=str(base), sharding={"strategy": "ddp"})
    with pytest.raises(grpc.RpcError) as info:
        client.submit_run(yaml.safe_dump(ddp), "too-big")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert details.startswith("spec.sharding.strategy: the run does not fit") and "72.0 GiB usable" in details
    needed = float(details.split("needs ")[1].split(" GiB")[0])
    assert needed > 100  # 6.86B parameters replicated with fp32 AdamW and EMA
    batch = v7_spec(manifest=str(manifest), base_model=str(base))
    batch["stages"][1]["batch_size"] = 512
    with pytest.raises(grpc.RpcError) as info:
        client.submit_run(yaml.safe_dump(batch))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("spec.stages[1].batch_size:")
    assert list(client.list_runs().runs) == []  # nothing was created
    # a CPU run is never refused by the plan: the tiny spec starts (and is cancelled here)
    cpu = tiny_spec(manifest, stages=[{"resolution": 32, "steps": 100000, "bucket_step": 16}])
    run = client.submit_run(yaml.safe_dump(cpu), "cpu-run").run
    assert run.run_id == "cpu-run"
    client.cancel_run("cpu-run")


def test_plan_tables_report_gib(tiny_models: Path) -> None:
    spec = parse_spec(v7_spec(stages=[{"resolution": 64, "steps": 1, "bucket_step": 16}]))
    plan = plan_memory(spec, 2, str(tiny_models / "auraflow"))
    assert plan.gpu_bytes == sum(t.gpu for t in plan.terms if t.counted)
    assert f"{plan.gpu_bytes / GIB:.2f}" in plan.table().splitlines()[-1]
