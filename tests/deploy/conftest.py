"""Fixtures for the deploy tests: the overlays rendered once per session with the real kubectl."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, Obj, kubectl, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Obj]]:
    if kubectl() is None:
        pytest.skip("kubectl is not installed on this machine; the deploy tests render with it")
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def prod(rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered["prod"]


@pytest.fixture(scope="session")
def dev(rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered["dev"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "containers: runs the built images in docker (`make images-test`)")
