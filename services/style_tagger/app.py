"""Builds the style tagger's `ServiceDefinition` (what `ponyctl serve style-tagger` and the in-process stack run)."""

from __future__ import annotations

from pony.v1 import style_tagger_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from services.style_tagger.model import SERVICE
from services.style_tagger.service import StyleTaggerService
from services.style_tagger.servicer import StyleTaggerServicer


def create_service(settings: Settings, service: StyleTaggerService | None = None) -> ServiceDefinition:
    """The gRPC service around `service` (default: a new `StyleTaggerService(settings)`); loads nothing until
    `load()`. A service passed in stays the caller's: the server does not tear its model down when it stops."""
    owned = service is None
    service = service or StyleTaggerService(settings)
    return service_definition(
        SERVICE,
        "pony.v1.StyleTagger",
        style_tagger_pb2_grpc.add_StyleTaggerServicer_to_server,
        StyleTaggerServicer(settings, service),
        service.model,
        close=service.close if owned else (lambda: None),
        model_id=settings.model_path(SERVICE),
    )
