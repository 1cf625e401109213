"""Builds the trainer controller service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from pony.v1 import trainer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from services.trainer.service import TrainerService
from services.trainer.servicer import TrainerControllerServicer


def create_service(settings: Settings, service: TrainerService | None = None) -> ServiceDefinition:
    """The `pony.v1.TrainerController` service around `service` (default: a new `TrainerService(settings)`; tests and
    the demo pass their own to keep a handle on it). `load()` adopts the runs an earlier controller left active."""
    service = service or TrainerService(settings)
    return service_definition(
        "trainer",
        "pony.v1.TrainerController",
        trainer_pb2_grpc.add_TrainerControllerServicer_to_server,
        TrainerControllerServicer(service),
        service,
        close=service.close,
    )
