"""Builds the safety service's `ServiceDefinition` (what `ponyctl serve safety` and `start_stack` run)."""

from __future__ import annotations

from pony.v1 import safety_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.safety.checker import SERVICE, SafetyChecker
from services.safety.servicer import SafetyServicer


def create_service(settings: Settings, backend: SafetyChecker | None = None) -> ServiceDefinition:
    """The gRPC service around `backend` (default: a new `SafetyChecker(settings)`); loads nothing until `load()`."""
    checker = backend or SafetyChecker(settings)
    servicer = SafetyServicer(settings, checker)
    return ServiceDefinition(
        name=SERVICE,
        full_names=["pony.v1.Safety"],
        register=lambda server: safety_pb2_grpc.add_SafetyServicer_to_server(servicer, server),
        load=checker.load,
        model_id=settings.model_path(SERVICE),
    )
