"""Builds the scorer service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from grpc import aio

from pony.v1 import scorer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.scorer.backend import AestheticScorer
from services.scorer.servicer import ScorerServicer


def create_service(settings: Settings) -> ServiceDefinition:
    """The `pony.v1.Scorer` service; `load()` loads CLIP + head (and the catalog's active head if configured)."""
    scorer = AestheticScorer.from_settings(settings)
    servicer = ScorerServicer(settings, scorer)

    def register(server: aio.Server) -> None:
        scorer_pb2_grpc.add_ScorerServicer_to_server(servicer, server)

    return ServiceDefinition(
        name="scorer",
        full_names=["pony.v1.Scorer"],
        register=register,
        load=servicer.load,
        close=servicer.close,
        model_id=scorer.tower_path,
    )
