"""Builds the captioner service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from pony.v1 import captioner_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from pony_common.imagerefs import ImageResolver
from services.captioner.service import CaptionerService
from services.captioner.servicer import CaptionerServicer


def create_service(settings: Settings) -> ServiceDefinition:
    """The `pony.v1.Captioner` service; `load()` loads the VLM named by `PONY_CAPTIONER_MODEL` (or models_dir/vlm), or
    opens the client of the OpenAI-compatible server when `PONY_CAPTIONER_ENGINE=openai`."""
    service = CaptionerService.from_settings(settings)
    return service_definition(
        "captioner",
        "pony.v1.Captioner",
        captioner_pb2_grpc.add_CaptionerServicer_to_server,
        CaptionerServicer(service, ImageResolver(settings)),
        service.model,
        close=service.close,
    )
