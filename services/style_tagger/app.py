"""Builds the style tagger's `ServiceDefinition` (what `ponyctl serve style-tagger` and `start_stack` run)."""

from __future__ import annotations

from pony.v1 import style_tagger_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.style_tagger.servicer import StyleTaggerServicer
from services.style_tagger.tagger import SERVICE, StyleTagger


def create_service(settings: Settings, backend: StyleTagger | None = None) -> ServiceDefinition:
    """The gRPC service around `backend` (default: a new `StyleTagger(settings)`); loads nothing until `load()`."""
    tagger = backend or StyleTagger(settings)
    servicer = StyleTaggerServicer(settings, tagger)
    return ServiceDefinition(
        name=SERVICE,
        full_names=["pony.v1.StyleTagger"],
        register=lambda server: style_tagger_pb2_grpc.add_StyleTaggerServicer_to_server(servicer, server),
        load=tagger.load,
        model_id=settings.model_path(SERVICE),
    )
