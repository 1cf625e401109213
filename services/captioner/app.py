"""Builds the captioner service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from grpc import aio

from pony.v1 import captioner_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.captioner.backend import VlmCaptioner
from services.captioner.servicer import CaptionerServicer


def create_service(settings: Settings) -> ServiceDefinition:
    """The `pony.v1.Captioner` service; `load()` loads the VLM named by `PONY_CAPTIONER_MODEL` (or models_dir/vlm)."""
    captioner = VlmCaptioner.from_settings(settings)
    servicer = CaptionerServicer(settings, captioner)

    def register(server: aio.Server) -> None:
        captioner_pb2_grpc.add_CaptionerServicer_to_server(servicer, server)

    return ServiceDefinition(
        name="captioner",
        full_names=["pony.v1.Captioner"],
        register=register,
        load=servicer.load,
        model_id=captioner.model_id,
    )
