"""The one factory every service's `app.py` wires itself through: servicer + model -> `ServiceDefinition`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grpc import aio

from pony_common.grpc.auth import method_roles
from pony_common.grpc.server import ServiceDefinition
from pony_common.models.lifecycle import Model


def service_definition(
    name: str,
    full_name: str,
    add_servicer: Callable[[Any, aio.Server], None],
    servicer: Any,
    model: Model | None = None,
    *,
    load: Callable[[], None] | None = None,
    close: Callable[[], None] | None = None,
    model_id: str = "",
) -> ServiceDefinition:
    """`name` is the CLI/config name (`style_tagger`), `full_name` the gRPC service (`pony.v1.StyleTagger`),
    `add_servicer` the generated `add_<X>Servicer_to_server`. The bootstrap runs `load` (default `model.load`)
    after binding (readiness follows it) and `close` (default `model.teardown`) after the server stops. The servicer's
    `ROLES` (method name -> `Role`) must name the role of every method of `full_name` (ValueError otherwise)."""
    return ServiceDefinition(
        name=name,
        full_names=[full_name],
        register=lambda server: add_servicer(servicer, server),
        load=load if load is not None else (model.load if model is not None else None),
        close=close if close is not None else (model.teardown if model is not None else None),
        model_id=model_id or (model.model_id if model is not None else ""),
        roles=method_roles(full_name, getattr(servicer, "ROLES", None)),
    )
