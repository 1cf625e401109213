"""Builds the trainer controller service for the gRPC bootstrap: `create_service(settings)`."""

from __future__ import annotations

from grpc import aio

from pony.v1 import trainer_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.trainer.controller import TrainerController
from services.trainer.servicer import TrainerControllerServicer


def create_service(settings: Settings) -> ServiceDefinition:
    """The `pony.v1.TrainerController` service; `load()` adopts the runs an earlier controller left active."""
    return service_definition(TrainerController(settings))


def service_definition(controller: TrainerController) -> ServiceDefinition:
    """The service around an existing controller (tests and the demo keep a handle on the domain object)."""
    servicer = TrainerControllerServicer(controller)

    def register(server: aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerControllerServicer_to_server(servicer, server)

    return ServiceDefinition(
        name="trainer",
        full_names=["pony.v1.TrainerController"],
        register=register,
        load=controller.load,
        close=controller.close,
        model_id=controller.settings.trainer.executor,
    )
