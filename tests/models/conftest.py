"""Fixtures for the model layer tests: the tiny models, built once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stack.tiny import build_tiny_models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What `ponyctl models tiny` writes, for this module: {"clip", "vlm", "auraflow", "heads/..."} -> folder."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)
