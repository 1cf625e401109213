"""The typed client of `pony.v1.Captioner` other deployables use (the curation tier's caption stage)."""

from __future__ import annotations

from pony.v1 import captioner_pb2, captioner_pb2_grpc
from pony_common.grpc.client import ServiceClient


class CaptionerClient(ServiceClient):
    """`caption(request)` blocks on the shared channel to `PONY_CAPTIONER_ADDR`; errors are grpc.RpcError
    (INVALID_ARGUMENT names the field, UNAVAILABLE means retry later)."""

    SERVICE = "captioner"
    STUB = captioner_pb2_grpc.CaptionerStub

    def caption(
        self, request: captioner_pb2.CaptionRequest, timeout: float | None = None
    ) -> captioner_pb2.CaptionResponse:
        """Captions of a batch of items; per-item failures are in each result's `error`."""
        return self.stub.Caption(request, timeout=self.deadline(timeout))
