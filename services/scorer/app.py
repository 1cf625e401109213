"""Builds the scorer service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from pony.v1 import scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from services.scorer.service import ScorerService
from services.scorer.servicer import ScorerServicer


def create_service(settings: Settings) -> ServiceDefinition:
    """The `pony.v1.Scorer` service; `load()` loads CLIP + head (and the catalog's active head if configured)."""
    service = ScorerService(settings)
    return service_definition(
        "scorer",
        "pony.v1.Scorer",
        scorer_pb2_grpc.add_ScorerServicer_to_server,
        ScorerServicer(service),
        service.model,
        close=service.close,
    )
