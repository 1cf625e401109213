"""The table of services: CLI names, config keys, and the module whose `create_service(settings)` builds each."""

from __future__ import annotations

import importlib

from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition

# CLI name -> module with `create_service(settings) -> ServiceDefinition`.
SERVICE_MODULES = {
    "captioner": "services.captioner.app",
    "scorer": "services.scorer.app",
    "style-tagger": "services.style_tagger.app",
    "safety": "services.safety.app",
    "trainer": "services.trainer.app",
    "sampler": "services.sampler.app",
}


def canonical(name: str) -> str:
    """`style_tagger` and `style-tagger` are the same service."""
    cli = name.replace("_", "-")
    if cli not in SERVICE_MODULES:
        raise KeyError(name)
    return cli


def available() -> list[str]:
    """The services whose packages are present in this checkout."""
    found = []
    for name, module in SERVICE_MODULES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        found.append(name)
    return found


def create_service(name: str, settings: Settings) -> ServiceDefinition:
    module = importlib.import_module(SERVICE_MODULES[canonical(name)])
    return module.create_service(settings)
