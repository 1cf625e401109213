"""Prompt assembly in V7 order, PNG parameters written and read back, and `ponyctl generate` (bad arguments exit 2
with one line; a real generation through the sampler; `--read` of the PNG it wrote)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from pony_common.cli.main import main
from pony_common.errors import InvalidArgument
from services.sampler.pnginfo import a1111_text, encode_png, parse_a1111, read_parameters
from services.sampler.prompts import PromptTags, assemble_prompt

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {
    "prompt": "score_9, style_cluster_4, source_pony, a pony, smiling: happy",
    "negative_prompt": "blurry, lowres",
    "steps": 28,
    "sampler": "Euler (flow matching)",
    "guidance": 3.5,
    "seed": 1234,
    "width": 1024,
    "height": 768,
    "model": "pony_v7",
    "model_version": "3",
}


def test_special_tags_come_first_in_v7_order() -> None:
    tags = PromptTags(score=7, style_clusters=(3, 12), source="anime", rating="safe")
    assert assemble_prompt("  a fox in the snow ", tags) == (
        "score_9, score_8, score_7, style_cluster_3, style_cluster_12, source_anime, rating_safe, "
        "a fox in the snow"  # V7: score 7 or better = the score tags of buckets 9..7 (pony_common.prompts.v7)
    )
    assert assemble_prompt("a fox", PromptTags(style_clusters=(42,)), style_format="anime_{n}") == "anime_42, a fox"
    assert assemble_prompt("a fox", tags, raw=True) == "a fox"
    assert assemble_prompt("a fox", PromptTags()) == "a fox"
    assert assemble_prompt("", PromptTags(score=9)) == "score_9"


@pytest.mark.parametrize(
    ("tags", "field"),
    [
        (PromptTags(score=10), "tags.score"),
        (PromptTags(style_clusters=(1, -2)), "tags.style_clusters[1]"),
        (PromptTags(source="photo"), "tags.source"),
        (PromptTags(rating="spicy"), "tags.rating"),
        (PromptTags(palette=("red", "mauve")), "tags.palette[1]"),
    ],
)
def test_bad_tags_name_their_field(tags: PromptTags, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        tags.validate()
    assert err.value.field == field


def test_png_parameters_round_trip_as_json_and_as_a1111_text() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    png = encode_png(pixels, PARAMS)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    params = read_parameters(png)
    assert {k: params[k] for k in PARAMS} == PARAMS
    text = params["parameters"]
    assert text.splitlines() == [
        PARAMS["prompt"],
        "Negative prompt: blurry, lowres",
        "Steps: 28, Sampler: Euler, Schedule type: Simple, CFG scale: 3.5, Seed: 1234, Size: 1024x768, "
        "Model: pony_v7, Model version: 3",  # A1111's name for the flow-matching Euler (pnginfo.A1111_SAMPLERS)
    ]
    assert parse_a1111(text) == {k: v for k, v in PARAMS.items()}
    assert parse_a1111(a1111_text({**PARAMS, "sampler": "a, b"}))["sampler"] == "a, b"


def test_a_png_with_only_a1111_text_is_read_too() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a pony\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Model: xl")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=info)
    params = read_parameters(buf.getvalue())
    assert (params["prompt"], params["seed"], params["width"], params["model"]) == ("a pony", 5, 512, "xl")
    assert params["negative_prompt"] == ""
    with pytest.raises(ValueError, match="no generation parameters"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG")
        read_parameters(buf.getvalue())
    with pytest.raises(ValueError, match="not a readable PNG"):
        read_parameters(b"not an image")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["generate", "a pony"], "--out FILE.png is required"),
        (["generate", "--out", "x.png"], "a PROMPT is required"),
        (["generate", "a pony", "--out", "x.png", "--width", "0"], "--width must be a positive number"),
        (["generate", "a pony", "--out", "x.png", "--seed", "-1"], "--seed must be >= 0"),
        (["generate", "a pony", "--out", "x.png", "--score", "12"], "--score must be in 0..9"),
        (["generate", "a pony", "--out", "/no/such/dir/x.png"], "does not exist"),
        (["generate", "--read", "/no/such.png"], "no such file"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str], reason: str, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and reason in err, err


def test_an_unknown_choice_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "a pony", "--out", "x.png", "--source", "photo"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_read_of_a_file_that_is_not_a_png_exits_2(tmp_path, capsys) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG but not really")
    assert main(["generate", "--read", str(bad)]) == 2
    assert "not a readable PNG" in capsys.readouterr().err


@pytest.mark.triton
def test_ponyctl_generate_writes_a_png_that_ponyctl_reads_back(sampler_stack, monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("PONY_SAMPLER_ADDR", sampler_stack.addr)
    monkeypatch.setenv("PONY_AUTH_TOKEN", sampler_stack.settings.auth_token)
    monkeypatch.setenv("PONY_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "pony.png"
    assert main(["generate", "a pony", "--seed", "3", "--out", str(out), "--steps", "2", "--score", "9"]) == 0
    assert f"{out}\tseed=3\tmodel=pony_v7:" in capsys.readouterr().out
    assert Image.open(out).size == (64, 64)
    assert main(["generate", "--read", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("score_9, a pony\n") and "Seed: 3, Size: 64x64, Model hash: " in text
    assert ", Model: pony_v7" in text  # after A1111's `Model hash`
    assert main(["generate", "--read", str(out), "--json"]) == 0
    params = json.loads(capsys.readouterr().out)
    assert (params["seed"], params["steps"], params["user_prompt"]) == (3, 2, "a pony")
    # Two images: FILE-0.png and FILE-1.png with seeds 7 and 8.
    assert main(["generate", "a pony", "--seed", "7", "--images", "2", "--out", str(out), "--steps", "1"]) == 0
    assert [read_parameters(Path(tmp_path / f"pony-{i}.png"))["seed"] for i in (0, 1)] == [7, 8]
    # The sampler's INVALID_ARGUMENT is a usage error too: exit 2, one line naming the field (its own process, so
    # the in-process servers' logs stay out of its stderr).
    env = {k: v for k, v in os.environ.items() if k.startswith(("PONY_", "PATH", "HOME"))}
    cmd = [sys.executable, "-m", "pony_common.cli.main", "generate", "a pony", "--out", str(out), "--width", "100"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == "ponyctl generate: width: must be a multiple of 16 (at least 16), got 100\n"
