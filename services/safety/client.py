"""The typed client of `pony.v1.Safety`: `check` (blocking) and `acheck` (on an event loop) send one CheckRequest.

client = SafetyClient(settings)                   # settings.safety_addr, bearer token, TLS, retries
response = client.check(safety_pb2.CheckRequest(items=[...]))
response = await client.acheck(request, timeout=30.0); await client.aclose()
"""

from __future__ import annotations

from pony.v1 import safety_pb2, safety_pb2_grpc
from pony_common.grpc.client import ServiceClient


class SafetyClient(ServiceClient):
    """Errors are grpc.RpcError (blocking) or grpc.aio.AioRpcError (async); without `timeout` the configured
    deadline (`rpc_timeout_s`) applies."""

    SERVICE = "safety"
    STUB = safety_pb2_grpc.SafetyStub

    def check(self, request: safety_pb2.CheckRequest, timeout: float | None = None) -> safety_pb2.CheckResponse:
        return self.stub.Check(request, timeout=self.deadline(timeout))

    async def acheck(self, request: safety_pb2.CheckRequest, timeout: float | None = None) -> safety_pb2.CheckResponse:
        return await self.aio_stub.Check(request, timeout=self.deadline(timeout))
