"""A model path that is no folder and no hub id fails before transformers or diffusers see it, with one line naming
the path and the fix; every service's model load goes through that one check."""

from __future__ import annotations

from pathlib import Path

import pytest

from pony_common.config import Settings
from pony_common.models.sources import ModelNotFoundError, looks_like_hub_id, require_model_source
from services.stack.registry import create_service


@pytest.mark.parametrize("hub_id", ["openai/clip-vit-large-patch14", "fal/AuraFlow-v0.3", "gpt2", "org/name.v1"])
def test_hub_ids_pass_through(hub_id: str) -> None:
    assert looks_like_hub_id(hub_id)
    assert require_model_source(hub_id, "scorer") == hub_id


@pytest.mark.parametrize("path", ["/weights/clip", "./clip", "../m/clip", "a/b/c", "~/clip", "org/-bad", "a--b", "x/"])
def test_paths_are_not_hub_ids(path: str) -> None:
    assert not looks_like_hub_id(path)


def test_an_existing_folder_passes(tmp_path: Path) -> None:
    assert require_model_source(str(tmp_path), "scorer") == str(tmp_path)


def test_a_missing_default_folder_names_the_path_and_ponyctl_models_tiny(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "auraflow"
    with pytest.raises(ModelNotFoundError) as err:
        require_model_source(str(missing), "sampler")
    message = str(err.value)
    assert "\n" not in message
    assert str(missing) in message
    assert f"`ponyctl models tiny {tmp_path / 'models'}`" in message and "PONY_SAMPLER_MODEL" in message


def test_a_missing_folder_of_another_name_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="PONY_STYLE_TAGGER_MODEL to a model folder or hub id"):
        require_model_source(str(tmp_path / "my-encoder"), "style_tagger")


def test_a_file_is_not_a_model_folder(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        require_model_source(str(weights), "captioner")


@pytest.mark.parametrize(
    ("name", "key"),
    [("captioner", "captioner"), ("scorer", "scorer"), ("style-tagger", "style_tagger"), ("safety", "safety"),
     ("sampler", "sampler")],
)  # fmt: skip
def test_every_model_service_load_checks_its_model_path_first(name: str, key: str, settings: Settings) -> None:
    """An empty models folder: each service's load fails with the shared error (not transformers' "Repo id ...")."""
    models = Path(settings.state_dir) / "no-models"
    settings = settings.replace(models_dir=str(models), triton_start=False)
    definition = create_service(name, settings)
    assert definition.load is not None
    try:
        with pytest.raises(ModelNotFoundError) as err:
            definition.load()
    finally:
        if definition.close is not None:
            definition.close()
    assert f"{key} model {models}" in str(err.value) and f"PONY_{key.upper()}_MODEL" in str(err.value)
