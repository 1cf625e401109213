"""`ponyctl models triton-repo DIR`: the dev Triton pod's init container renders the pony_v7 repository before
tritonserver starts; the files are the ones the sampler renders, and existing versions are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from pony_common.cli.main import main
from pony_common.config import Settings
from services.sampler.repository import MODEL_NAME, ModelRepository, render_config


@pytest.fixture
def cli_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in {
        "PONY_STATE_DIR": str(tmp_path / "state"),
        "PONY_MODELS_DIR": str(tmp_path / "models"),
        "PONY_TRITON_REPO": str(tmp_path / "default-repo"),
        "PONY_DEVICE": "cpu",
        "PONY_DTYPE": "float32",
        "PONY_LOG_JSON": "false",
        "PONY_LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_it_writes_what_the_sampler_renders(cli_settings: Settings, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    assert main(["models", "triton-repo", str(repo)]) == 0
    model = cli_settings.model_path("sampler")
    assert capsys.readouterr().out.splitlines() == [f"{MODEL_NAME}\t1\t{model}"]
    assert (repo / MODEL_NAME / "config.pbtxt").read_text() == render_config(cli_settings, model)
    assert (repo / MODEL_NAME / "1" / "model.py").is_file()
    before = snapshot(repo)
    ModelRepository(repo).render(cli_settings)  # what the sampler does at start
    assert snapshot(repo) == before


def test_the_default_folder_is_the_configured_repository(cli_settings: Settings) -> None:
    assert main(["models", "triton-repo"]) == 0
    assert [v.version for v in ModelRepository(cli_settings.sampler.triton_repo).versions()] == [1]


def test_model_names_version_one_and_later_versions_are_kept(cli_settings: Settings, tmp_path: Path) -> None:
    first, second = tmp_path / "pipe-a", tmp_path / "pipe-b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
    repo = tmp_path / "repo"
    assert main(["models", "triton-repo", str(repo), "--model", str(first)]) == 0
    repository = ModelRepository(repo)
    assert [(v.version, v.uri) for v in repository.versions()] == [(1, str(first))]
    assert f'"{first}"' in (repo / MODEL_NAME / "config.pbtxt").read_text()
    repository.add_version(str(second))
    assert main(["models", "triton-repo", str(repo), "--model", str(first)]) == 0
    assert [(v.version, v.uri) for v in repository.versions()] == [(1, str(first)), (2, str(second))]


def test_bad_arguments_exit_2_with_one_line(cli_settings: Settings, tmp_path: Path, capsys) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert main(["models", "triton-repo", str(not_a_folder)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["models", "triton-repo", str(tmp_path / "repo"), "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]
