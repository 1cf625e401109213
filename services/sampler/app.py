"""The sampler service: `pony.v1.Sampler` on port 50056 in front of Triton's `pony_v7` model, and, when
PONY_SAMPLER_HTTP_PORT is set, the same generation for plain KServe v2 HTTP clients (`kserve_http.py`)."""

from __future__ import annotations

from grpc import aio

from pony.v1 import sampler_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.app import service_definition
from pony_common.grpc.server import ServiceDefinition
from services.sampler.kserve_http import KServeHTTPServer
from services.sampler.model import SamplerModel
from services.sampler.safety_gate import SafetyGate
from services.sampler.service import SamplerService
from services.sampler.servicer import SamplerServicer


def create_service(settings: Settings, *, model: SamplerModel | None = None) -> ServiceDefinition:
    """`model` lets a caller (a test, the demo) keep a handle on Triton; by default one is made from settings."""
    model = model or SamplerModel(settings)
    service = SamplerService(settings, model, SafetyGate(settings))
    http = KServeHTTPServer(settings, service)

    def close() -> None:
        http.stop()  # first: its requests in flight still need the model
        service.close()

    definition = service_definition(
        "sampler",
        "pony.v1.Sampler",
        sampler_pb2_grpc.add_SamplerServicer_to_server,
        SamplerServicer(service),
        model,
        # The service's load wraps the model's: catalog versions become repository folders before Triton starts,
        # and the folders are recorded in the catalog once it serves them.
        load=service.load,
        close=close,
    )
    if settings.sampler.http_port:
        register_grpc = definition.register

        def register(server: aio.Server) -> None:
            # The bootstrap registers the servicers just before it binds: the HTTP port binds here too, in its own
            # thread and event loop (a bind error or missing tokens fail the start, as for the gRPC port).
            register_grpc(server)
            http.start(settings.bind_host, settings.sampler.http_port)

        definition.register = register
    return definition
