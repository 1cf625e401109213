"""The sampler service: `pony.v1.Sampler` on port 50056 in front of Triton's `pony_v7` model."""

from __future__ import annotations

from grpc import aio

from pony.v1 import sampler_pb2_grpc
from pony_common.config import Settings
from pony_common.grpc.server import ServiceDefinition
from services.sampler.backend import TritonSampler
from services.sampler.safety_gate import SafetyGate
from services.sampler.sampler import Sampler
from services.sampler.servicer import SamplerServicer


def create_service(settings: Settings, *, backend: TritonSampler | None = None) -> ServiceDefinition:
    """`backend` lets a caller (a test, the demo) keep a handle on Triton; by default one is made from settings."""
    sampler = Sampler(settings, backend or TritonSampler(settings), SafetyGate(settings))

    def register(server: aio.Server) -> None:
        sampler_pb2_grpc.add_SamplerServicer_to_server(SamplerServicer(settings, sampler), server)

    return ServiceDefinition(
        name="sampler",
        full_names=["pony.v1.Sampler"],
        register=register,
        load=sampler.load,
        close=sampler.close,
        model_id=settings.model_path("sampler"),
    )
