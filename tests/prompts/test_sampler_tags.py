"""The real sampler server (the shared session stack: tritonserver + safety + sampler) takes palette tags and a
family-prefixed style tag format: the prompt it generated from is the convention's, an unknown colour is
INVALID_ARGUMENT naming `tags.palette[i]`."""

from __future__ import annotations

import grpc
import pytest

from pony.v1 import sampler_pb2
from services.sampler.client import SamplerClient
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton


def test_the_sampler_server_accepts_palette_tags_and_a_family_prefixed_style_format(
    sampler_stack: SamplerStack,
) -> None:
    base = sampler_stack.settings.replace(
        triton_start=False, triton_url=sampler_stack.model.url, style_tag_format="{family}_{n}"
    )
    prefixed = sampler_stack.start_sampler(base)
    try:
        with SamplerClient(base, target=f"127.0.0.1:{prefixed.port}", timeout=120) as client:
            resp = client.generate(
                "a pony",
                seed=5,
                steps=1,
                score=8,
                style_clusters=[2],
                style_family="anime",
                source="anime",
                palette=["red", "sky_blue"],
            )
            assert resp.safety == sampler_pb2.SAFETY_STATUS_CHECKED
            assert resp.prompt == "score_9, score_8, anime_2, source_anime, palette_red, palette_sky_blue, a pony"
            named = client.generate("a pony", seed=5, steps=1, style_clusters=[2], style_family="furry")
            assert named.prompt == "furry_2, a pony"
            unnamed = client.generate("a pony", seed=5, steps=1, style_clusters=[2])
            assert unnamed.prompt == "style_2, a pony"  # no family: the global cluster set's token, no KeyError
            with pytest.raises(grpc.RpcError) as err:
                client.generate("a pony", seed=5, steps=1, palette=["red", "chartreuse"])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "tags.palette[1]" in err.value.details()
    finally:
        sampler_stack.stop_server(prefixed)
