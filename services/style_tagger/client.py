"""The typed client of `pony.v1.StyleTagger`: one blocking method per RPC, each sending one request message.

client = StyleTaggerClient(settings)              # settings.style_tagger_addr, bearer token, TLS, retries
response = client.tag(style_tagger_pb2.TagRequest(images=[...], include_embedding=True))
response = client.fit_clusters(style_tagger_pb2.FitClustersRequest(k=8, activate=True), timeout=600.0)
"""

from __future__ import annotations

from pony.v1 import style_tagger_pb2, style_tagger_pb2_grpc
from pony_common.grpc.client import ServiceClient


class StyleTaggerClient(ServiceClient):
    """Errors are grpc.RpcError; without `timeout` the configured deadline (`rpc_timeout_s`) applies."""

    SERVICE = "style_tagger"
    STUB = style_tagger_pb2_grpc.StyleTaggerStub

    def embed(
        self, request: style_tagger_pb2.StyleTaggerEmbedRequest, timeout: float | None = None
    ) -> style_tagger_pb2.StyleTaggerEmbedResponse:
        return self.stub.Embed(request, timeout=self.deadline(timeout))

    def fit_clusters(
        self, request: style_tagger_pb2.FitClustersRequest, timeout: float | None = None
    ) -> style_tagger_pb2.FitClustersResponse:
        return self.stub.FitClusters(request, timeout=self.deadline(timeout))

    def tag(self, request: style_tagger_pb2.TagRequest, timeout: float | None = None) -> style_tagger_pb2.TagResponse:
        return self.stub.Tag(request, timeout=self.deadline(timeout))

    def similar_styles(
        self, request: style_tagger_pb2.SimilarStylesRequest, timeout: float | None = None
    ) -> style_tagger_pb2.SimilarStylesResponse:
        return self.stub.SimilarStyles(request, timeout=self.deadline(timeout))

    def palette(
        self, request: style_tagger_pb2.PaletteRequest, timeout: float | None = None
    ) -> style_tagger_pb2.PaletteResponse:
        return self.stub.Palette(request, timeout=self.deadline(timeout))
