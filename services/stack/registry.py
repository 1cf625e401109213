"""The table of services: CLI names, config keys, and the module whose `create_service(settings)` builds each."""

from __future__ import annotations

import importlib
import importlib.util

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


def load_all_tables() -> set[str]:
    """Imports every package's `store.py` so that each table the platform owns is in `Base.metadata`; returns
    their names (what the catalog migrations must create)."""
    import pkgutil

    import services
    from pony_common.catalog.models import Base

    for info in pkgutil.iter_modules(services.__path__):
        if info.ispkg and importlib.util.find_spec(f"services.{info.name}.store") is not None:
            importlib.import_module(f"services.{info.name}.store")
    return set(Base.metadata.tables)
