"""The typed client of `pony.v1.Scorer`: `score`, `embed` and `score_embeddings` (blocking) send one request each.

client = ScorerClient(settings)                   # settings.scorer_addr, bearer token, TLS, retries
response = client.score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri=key)]))
"""

from __future__ import annotations

from pony.v1 import scorer_pb2, scorer_pb2_grpc
from pony_common.grpc.client import ServiceClient


class ScorerClient(ServiceClient):
    """Errors are grpc.RpcError; without `timeout` the configured deadline (`rpc_timeout_s`) applies."""

    SERVICE = "scorer"
    STUB = scorer_pb2_grpc.ScorerStub

    def score(self, request: scorer_pb2.ScoreRequest, timeout: float | None = None) -> scorer_pb2.ScoreResponse:
        return self.stub.Score(request, timeout=self.deadline(timeout))

    def embed(self, request: scorer_pb2.EmbedRequest, timeout: float | None = None) -> scorer_pb2.EmbedResponse:
        return self.stub.Embed(request, timeout=self.deadline(timeout))

    def score_embeddings(
        self, request: scorer_pb2.ScoreEmbeddingsRequest, timeout: float | None = None
    ) -> scorer_pb2.ScoreEmbeddingsResponse:
        return self.stub.ScoreEmbeddings(request, timeout=self.deadline(timeout))
