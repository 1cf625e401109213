"""Builds the safety service's `ServiceDefinition` (what `ponyctl serve safety` and the in-process stack run)."""

from __future__ import annotations

from pony.v1 import safety_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from pony_common.imagerefs import ImageResolver
from services.safety.model import SERVICE
from services.safety.service import SafetyService
from services.safety.servicer import SafetyServicer


def create_service(settings: Settings, service: SafetyService | None = None) -> ServiceDefinition:
    """The `pony.v1.Safety` service around `service` (default: a new `SafetyService(settings)`); loads nothing
    until `load()`."""
    service = service or SafetyService(settings)
    return service_definition(
        SERVICE,
        "pony.v1.Safety",
        safety_pb2_grpc.add_SafetyServicer_to_server,
        SafetyServicer(service, ImageResolver(settings)),
        service.model,
        close=service.close,
    )
