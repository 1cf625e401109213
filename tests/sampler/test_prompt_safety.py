"""The sampler checks the prompt itself before generating, through the real safety service and its normalised
comparison keys: every spelling variant of a blocked tag is refused (a result with no image, each seed blocked with
the rule's reason) without a request reaching Triton; benign neighbours and Japanese names generate as before."""

from __future__ import annotations

import pytest

from pony.v1 import sampler_pb2
from services.sampler.client import SamplerClient
from tests.safety.test_normalisation import BENIGN, SPELLING_IDS, SPELLINGS
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def client(sampler_stack: SamplerStack):
    with SamplerClient(sampler_stack.settings, timeout=120) as c:
        yield c


def inference_count(stack: SamplerStack) -> int:
    """Requests Triton has run on the model, all versions together (its statistics API)."""
    stats = stack.model.control.get_inference_statistics(model_name="pony_v7", as_json=True)
    return sum(int(s.get("inference_count", 0)) for s in stats.get("model_stats", []))


@pytest.mark.parametrize(("tag", "variant", "spelled"), SPELLINGS, ids=SPELLING_IDS)
def test_a_blocked_prompt_is_refused_in_every_spelling_before_triton(
    sampler_stack: SamplerStack, client, tag: str, variant: str, spelled: str
) -> None:
    before = inference_count(sampler_stack)
    resp = client.generate(f"a pony, {spelled}, standing in a field", seed=3, num_images=2, steps=1)
    assert not resp.images, (variant, spelled)
    assert [b.seed for b in resp.blocked] == [3, 4]
    for blocked in resp.blocked:
        assert [r.rule_id for r in blocked.reasons] == ["tags.blocked"]
        assert blocked.reasons[0].message.startswith(f"prompt refused before generation: blocked tag {tag!r}")
    assert resp.safety == sampler_pb2.SAFETY_STATUS_CHECKED
    assert spelled in resp.prompt  # what the caller reads back is the prompt as written
    assert inference_count(sampler_stack) == before  # no GPU work for a refused prompt


def test_a_refused_stream_sends_its_result_and_no_progress(sampler_stack: SamplerStack, client) -> None:
    _, _, spelled = SPELLINGS[-1]
    before = inference_count(sampler_stack)
    events = list(client.stream(f"score_9, {spelled}", seed=1, steps=2))
    assert [e.WhichOneof("event") for e in events] == ["result"]
    assert not events[0].result.images and events[0].result.blocked[0].seed == 1
    assert inference_count(sampler_stack) == before


@pytest.mark.parametrize("text", [*BENIGN[:2], BENIGN[5], BENIGN[7]])
def test_benign_neighbours_and_non_latin_prompts_generate(sampler_stack: SamplerStack, client, text: str) -> None:
    before = inference_count(sampler_stack)
    resp = client.generate(text, seed=2, steps=1)
    assert len(resp.images) == 1 and not resp.blocked, [r.message for b in resp.blocked for r in b.reasons]
    assert inference_count(sampler_stack) > before


def test_a_blocked_tag_in_the_negative_prompt_does_not_refuse(client) -> None:
    resp = client.generate("a pony", negative_prompt="ｌｏｌｉ, child_porn, blurry", seed=4, steps=1)
    assert len(resp.images) == 1 and not resp.blocked
