"""The hostile-input battery: a table of hostile requests against the six real services (NUL bytes and control
characters in ids and text, over-long ids, huge fields, garbage bytes and invalid UTF-8, file and URL references
outside the allowed roots, path traversal, request budgets, wrong enum values, negative counts, Unicode disguises
of blocked tags, missing, wrong and under-privileged tokens). Each is answered by the one named status the issue
requires, never INTERNAL or UNKNOWN; the message is bounded, shows no Python class name or traceback, names the
field at fault; a reference outside the roots is answered the same whether or not the file exists; and the service
is still SERVING afterwards."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from pony.v1 import (
    captioner_pb2,
    common_pb2,
    safety_pb2,
    sampler_pb2,
    scorer_pb2,
    style_tagger_pb2,
    trainer_pb2,
)
from pony_common.errors import InvalidArgument
from pony_common.fields import ID_MAX, NAME_MAX, check_id, check_names, check_text
from pony_common.grpc.interceptors import MAX_DETAILS_BYTES, status_details, status_for
from tests.security.conftest import GENERATE_TOKEN, WORKER_TOKEN, Battery
from tests.trainer.conftest import tiny_spec

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

SERVICES = {
    "captioner": "pony.v1.Captioner",
    "scorer": "pony.v1.Scorer",
    "style-tagger": "pony.v1.StyleTagger",
    "safety": "pony.v1.Safety",
    "trainer": "pony.v1.TrainerController",
    "sampler": "pony.v1.Sampler",
}
MAX_MESSAGE_BYTES = 2048
MAX_TRAILER_BYTES = 4096  # well under the 8 KiB a client accepts by default
# What a caller must never read in a status message: tracebacks, Python class names, driver and library internals.
LEAKS = re.compile(
    r"Traceback|<class |File \"|\b(?:[A-Z][a-z0-9]+)+(?:Error|Exception|Warning)\b|psycopg|sqlalchemy|sqlite3"
    r"|google\.protobuf|site-packages|\.py\b"
)
CALL_TIMEOUT_S = 120
NUL = "\x00"
HUGE = 300_000  # characters: a field this long once made the client see a transport error instead of the status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (a string, bytes or a nested message), written by hand."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


GARBAGE = b"\x00\x01\x02\xff\xfe\xfd"  # field number 0: no message parses it
BAD_UTF8 = b"\xc3\x28"  # an invalid two-byte UTF-8 sequence
TRUNCATED = ld(1, b"abcdef")[:-2]  # a length that runs past the end


def png(size: tuple[int, int] = (16, 16), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def ref(uri: str = "", data: bytes = b"", image_id: str = "") -> common_pb2.ImageRef:
    return common_pb2.ImageRef(uri=uri, image_id=image_id) if uri else common_pb2.ImageRef(data=data, image_id=image_id)


def score(*refs: common_pb2.ImageRef) -> scorer_pb2.ScoreRequest:
    return scorer_pb2.ScoreRequest(images=list(refs))


def caption(**item: Any) -> captioner_pb2.CaptionRequest:
    item.setdefault("image", ref(data=png()))
    return captioner_pb2.CaptionRequest(items=[captioner_pb2.CaptionItem(**item)], max_new_tokens=8)


def check(**item: Any) -> safety_pb2.CheckRequest:
    return safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(**item)])


def similar(uri: str) -> style_tagger_pb2.SimilarStylesRequest:
    return style_tagger_pb2.SimilarStylesRequest(image=ref(uri=uri))


def generate(**fields: Any) -> sampler_pb2.GenerateRequest:
    fields.setdefault("prompt", "a pony in a meadow")
    return sampler_pb2.GenerateRequest(**fields)


def spec_yaml(**overrides: Any) -> Callable[[Battery], trainer_pb2.SubmitRunRequest]:
    """A tiny training spec on the battery's real manifest (inside the allowed roots), with `overrides`."""

    def build(battery: Battery) -> trainer_pb2.SubmitRunRequest:
        spec = {**tiny_spec(battery.manifest), **overrides}
        return trainer_pb2.SubmitRunRequest(spec_yaml=yaml.safe_dump(spec))

    return build


Request = Message | bytes | Callable[[Battery], Message]


@dataclass(frozen=True)
class Case:
    """One hostile request and the answer it must get. `code` OK means the call succeeds and the answer is in the
    response: `field` then names the first result's ItemError field, or `verdict` checks the response."""

    service: str
    method: str
    request: Request
    code: grpc.StatusCode
    field: str = ""  # INVALID_ARGUMENT: the field the message names; OK: results[0].error.field
    token: str | None = None  # None: the target's own token; "": no authorization header
    twin: Request | None = None  # the same reference to something that does not exist: the same answer
    verdict: Callable[[Any], str] | None = None  # OK: "" when the response is right, else what is wrong
    metadata: tuple[tuple[str, str], ...] = ()  # more request headers


def case(
    case_id: str, service: str, method: str, request: Request, code: grpc.StatusCode, field: str = "", **kw: Any
) -> Any:
    return pytest.param(Case(service, method, request, code, field, **kw), id=case_id)


def blocked(response: safety_pb2.CheckResponse) -> str:
    result = response.results[0]
    if result.error.reason:
        return f"an item error instead of a verdict: {result.error.message}"
    return "" if result.decision == safety_pb2.DECISION_BLOCK else "allowed: the disguised blocked tag got through"


def all_images_blocked(response: sampler_pb2.GenerateResponse) -> str:
    if response.images or not response.blocked:
        return f"{len(response.images)} images returned, {len(response.blocked)} blocked: the prompt got through"
    return ""


X = "x"
CASES = [
    # --- malformed messages: garbage bytes, invalid UTF-8 in a string field, truncated (one or more per service) ---
    case("captioner-garbage-bytes", "captioner", "Caption", GARBAGE, INVALID, "request"),
    case("captioner-invalid-utf8-item-id", "captioner", "Caption", ld(1, ld(5, BAD_UTF8)), INVALID, "request"),
    case("captioner-stream-truncated", "captioner", "CaptionStream", TRUNCATED, INVALID, "request"),
    case("scorer-garbage-bytes", "scorer", "Score", GARBAGE, INVALID, "request"),
    case("scorer-invalid-utf8-rater", "scorer", "NextPair", ld(1, BAD_UTF8), INVALID, "request"),
    case("style-tagger-garbage-bytes", "style-tagger", "Tag", GARBAGE, INVALID, "request"),
    case("style-tagger-invalid-utf8-uri", "style-tagger", "Embed", ld(1, ld(2, BAD_UTF8)), INVALID, "request"),
    case("safety-garbage-bytes", "safety", "Check", GARBAGE, INVALID, "request"),
    case("safety-invalid-utf8-caption", "safety", "Check", ld(1, ld(2, BAD_UTF8)), INVALID, "request"),
    case("trainer-garbage-bytes", "trainer", "GetRun", GARBAGE, INVALID, "request"),
    case("trainer-invalid-utf8-spec", "trainer", "SubmitRun", ld(1, BAD_UTF8), INVALID, "request"),
    case("trainer-watch-truncated", "trainer", "WatchRun", TRUNCATED, INVALID, "request"),
    case("sampler-garbage-bytes", "sampler", "Generate", GARBAGE, INVALID, "request"),
    case("sampler-invalid-utf8-prompt", "sampler", "Generate", ld(1, BAD_UTF8), INVALID, "request"),
    case("sampler-stream-truncated", "sampler", "GenerateStream", TRUNCATED, INVALID, "request"),
    case("health-garbage-bytes", "scorer", "/grpc.health.v1.Health/Check", GARBAGE, INVALID, "request"),
    # --- NUL bytes and control characters in ids and text ---
    case("scorer-next-pair-rater-nul", "scorer", "NextPair", scorer_pb2.NextPairRequest(rater=f"a{NUL}b"), INVALID,
         "rater"),
    case("scorer-comparison-winner-nul", "scorer", "SubmitComparison",
         scorer_pb2.SubmitComparisonRequest(rater="r", winner_id=f"a{NUL}", loser_id="b"), INVALID, "winner_id"),
    case("scorer-comparison-loser-nul", "scorer", "SubmitComparison",
         scorer_pb2.SubmitComparisonRequest(rater="r", winner_id="a", loser_id=NUL), INVALID, "loser_id"),
    case("scorer-comparison-rater-bidi-override", "scorer", "SubmitComparison",
         scorer_pb2.SubmitComparisonRequest(rater="admin\u202egnp.", winner_id="a", loser_id="b"), INVALID, "rater"),
    case("scorer-score-embeddings-image-id-nul", "scorer", "ScoreEmbeddings",
         scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=[1.0])], image_ids=[f"i{NUL}"]),
         INVALID, "image_ids[0]"),
    case("scorer-score-image-id-nul", "scorer", "Score", score(ref(data=png(), image_id=f"id{NUL}")), OK,
         "images[0].image_id"),
    case("scorer-embed-uri-nul", "scorer", "Embed", scorer_pb2.EmbedRequest(images=[ref(uri=f"images/a{NUL}.png")]),
         OK, "images[0].uri"),
    case("style-tagger-embed-image-id-nul", "style-tagger", "Embed",
         style_tagger_pb2.StyleTaggerEmbedRequest(images=[ref(data=png(), image_id=NUL)]), OK, "images[0].image_id"),
    case("style-tagger-similar-uri-nul", "style-tagger", "SimilarStyles", similar(f"images/{NUL}x.png"), INVALID,
         "image.uri"),
    case("captioner-item-id-nul", "captioner", "Caption", caption(item_id=f"item{NUL}"), INVALID, "items[0].item_id"),
    case("captioner-tag-nul", "captioner", "Caption", caption(tags=[f"pony{NUL}"]), INVALID, "items[0].tags[0]"),
    case("captioner-character-terminal-escape", "captioner", "CaptionStream", caption(characters=["\x1b[31mred"]),
         INVALID, "items[0].characters[0]"),
    case("safety-item-id-nul", "safety", "Check", check(item_id=NUL, caption="a pony"), OK, "items[0].item_id"),
    case("safety-caption-nul", "safety", "Check", check(caption=f"a pony{NUL}"), OK, "items[0].caption"),
    case("safety-tag-nul", "safety", "Check", check(tags=[f"solo{NUL}"]), OK, "items[0].tags[0]"),
    case("trainer-get-run-nul", "trainer", "GetRun", trainer_pb2.GetRunRequest(run_id=f"run{NUL}"), INVALID,
         "run_id"),
    case("trainer-cancel-run-nul", "trainer", "CancelRun", trainer_pb2.CancelRunRequest(run_id=NUL), INVALID,
         "run_id"),
    case("trainer-watch-run-nul", "trainer", "WatchRun", trainer_pb2.WatchRunRequest(run_id=f"a{NUL}"), INVALID,
         "run_id"),
    case("trainer-submit-run-id-nul", "trainer", "SubmitRun",
         trainer_pb2.SubmitRunRequest(spec_yaml="name: x\n", run_id=f"r{NUL}"), INVALID, "run_id"),
    case("trainer-spec-name-yaml-escaped-nul", "trainer", "SubmitRun",
         trainer_pb2.SubmitRunRequest(spec_yaml='name: "tiny\\0"\nmanifest: m.parquet\nstages: []\n'), INVALID,
         "spec.name"),
    case("trainer-list-runs-page-token-nul", "trainer", "ListRuns", trainer_pb2.ListRunsRequest(page_token=NUL),
         INVALID, "page_token"),
    case("sampler-get-job-nul", "sampler", "GetJob", sampler_pb2.GetJobRequest(job_id=f"job{NUL}"), INVALID,
         "job_id"),
    case("sampler-watch-job-nul", "sampler", "WatchJob", sampler_pb2.WatchJobRequest(job_id=NUL), INVALID, "job_id"),
    case("sampler-cancel-job-nul", "sampler", "CancelJob", sampler_pb2.CancelJobRequest(job_id=f"{NUL}1"), INVALID,
         "job_id"),
    case("sampler-load-version-source-run-nul", "sampler", "LoadVersion",
         sampler_pb2.LoadVersionRequest(uri="runs/x", source_run_id=NUL), INVALID, "source_run_id"),
    case("sampler-prompt-nul", "sampler", "Generate", generate(prompt=f"a pony{NUL}"), INVALID, "prompt"),
    case("sampler-submit-job-negative-prompt-nul", "sampler", "SubmitJob",
         sampler_pb2.SubmitJobRequest(request=generate(negative_prompt=f"blur{NUL}")), INVALID, "negative_prompt"),
    case("sampler-source-tag-newline", "sampler", "Generate",
         generate(tags=sampler_pb2.PromptTags(source="pony\nrating_explicit")), INVALID, "tags.source"),
    # --- over-long ids and huge fields: INVALID_ARGUMENT naming the field, the message still small ---
    case("scorer-next-pair-rater-10k", "scorer", "NextPair", scorer_pb2.NextPairRequest(rater=X * 10_000), INVALID,
         "rater"),
    case("scorer-comparison-winner-300k", "scorer", "SubmitComparison",
         scorer_pb2.SubmitComparisonRequest(rater="r", winner_id=X * HUGE, loser_id="b"), INVALID, "winner_id"),
    case("trainer-get-run-10k", "trainer", "GetRun", trainer_pb2.GetRunRequest(run_id=X * 10_000), INVALID,
         "run_id"),
    case("trainer-submit-spec-2mb", "trainer", "SubmitRun",
         trainer_pb2.SubmitRunRequest(spec_yaml="name: x\n" + "# padding\n" * 200_000), INVALID, "spec_yaml"),
    case("trainer-list-runs-negative-page-token", "trainer", "ListRuns", trainer_pb2.ListRunsRequest(page_token="-5"),
         INVALID, "page_token"),
    case("trainer-list-runs-overflowing-page-token", "trainer", "ListRuns",
         trainer_pb2.ListRunsRequest(page_token="9" * 40), INVALID, "page_token"),
    case("sampler-get-job-10k", "sampler", "GetJob", sampler_pb2.GetJobRequest(job_id=X * 10_000), INVALID,
         "job_id"),
    case("sampler-source-tag-300k", "sampler", "Generate", generate(tags=sampler_pb2.PromptTags(source=X * HUGE)),
         INVALID, "tags.source"),
    case("sampler-prompt-300k", "sampler", "Generate", generate(prompt="pony " * (HUGE // 5)), INVALID, "prompt"),
    case("sampler-load-version-uri-300k", "sampler", "LoadVersion", sampler_pb2.LoadVersionRequest(uri="/" + X * HUGE),
         INVALID, "uri"),
    case("captioner-item-id-300k", "captioner", "Caption", caption(item_id=X * HUGE), INVALID, "items[0].item_id"),
    case("captioner-tag-300k", "captioner", "Caption", caption(tags=[X * HUGE]), INVALID, "items[0].tags[0]"),
    case("style-tagger-similar-uri-300k", "style-tagger", "SimilarStyles", similar("images/" + X * HUGE), INVALID,
         "image.uri"),
    case("style-tagger-similar-long-missing-path-echo", "style-tagger", "SimilarStyles",
         similar("/tmp/" + "missing/" * 500 + "x.png"), INVALID, "image.uri"),
    case("safety-caption-300k", "safety", "Check", check(caption=X * HUGE), OK, "items[0].caption"),
    case("trainer-spec-huge-unknown-key-echo", "trainer", "SubmitRun", spec_yaml(**{"k" * 500_000: 1}), INVALID,
         "spec." + "k" * 100),
    case("scorer-huge-request-id-header", "scorer", "NextPair", scorer_pb2.NextPairRequest(rater=NUL), INVALID,
         "rater", metadata=(("x-request-id", "r" * 7500),)),
    # --- file and URL references outside the allowed roots; the same answer whether or not the file exists ---
    case("style-tagger-uri-etc-passwd", "style-tagger", "SimilarStyles", similar("/etc/passwd"), INVALID, "image.uri",
         twin=similar("/etc/no-such-file-pony")),
    case("style-tagger-file-url-etc-passwd", "style-tagger", "SimilarStyles", similar("file:///etc/passwd"), INVALID,
         "image.uri", twin=similar("file:///etc/no-such-file-pony")),
    case("style-tagger-blob-key-traversal", "style-tagger", "SimilarStyles", similar("../../../../../../etc/passwd"),
         INVALID, "image.uri", twin=similar("../../../../../../etc/no-such-file-pony")),
    case("style-tagger-url-loopback-host", "style-tagger", "SimilarStyles", similar("http://127.0.0.1:1/x.png"),
         INVALID, "image.uri"),
    case("style-tagger-url-metadata-host", "style-tagger", "SimilarStyles",
         similar("http://169.254.169.254/latest/meta-data/"), INVALID, "image.uri"),
    case("scorer-uri-etc-passwd", "scorer", "Score", score(ref(uri="/etc/passwd")), OK, "images[0].uri",
         twin=score(ref(uri="/etc/no-such-file-pony"))),
    case("captioner-uri-proc-self-environ", "captioner", "Caption", caption(image=ref(uri="/proc/self/environ")), OK,
         "items[0].image.uri"),
    case("safety-file-url-etc-shadow", "safety", "Check", check(image=ref(uri="file:///etc/shadow")), OK,
         "items[0].image.uri", twin=check(image=ref(uri="file:///etc/no-such-file-pony"))),
    case("sampler-load-version-etc", "sampler", "LoadVersion", sampler_pb2.LoadVersionRequest(uri="/etc"), INVALID,
         "uri", twin=sampler_pb2.LoadVersionRequest(uri="/etc/no-such-dir-pony")),
    case("sampler-load-version-traversal", "sampler", "LoadVersion",
         sampler_pb2.LoadVersionRequest(uri="../../../../../../etc"), INVALID, "uri"),
    case("trainer-spec-manifest-etc-passwd", "trainer", "SubmitRun", spec_yaml(manifest="/etc/passwd"), INVALID,
         "spec.manifest", twin=spec_yaml(manifest="/etc/no-such-file-pony")),
    case("trainer-spec-base-model-etc", "trainer", "SubmitRun", spec_yaml(base_model="/etc"), INVALID,
         "spec.base_model"),
    case("trainer-spec-output-outside-roots", "trainer", "SubmitRun", spec_yaml(output="/tmp/pony-battery-out"),
         INVALID, "spec.output"),
    case("trainer-spec-image-foreign-registry", "trainer", "SubmitRun",
         spec_yaml(resources={"image": "docker.io/attacker/miner:latest"}), INVALID, "spec.resources.image"),
    # --- request budgets (the battery's stack: 1 MP decoded and 2 MB read per request) ---
    case("scorer-pixels-over-request-budget", "scorer", "Score",
         score(ref(data=png((800, 800))), ref(data=png((800, 800), (1, 2, 3)))), INVALID, "images"),
    case("style-tagger-bytes-over-request-budget", "style-tagger", "Embed",
         style_tagger_pb2.StyleTaggerEmbedRequest(images=[ref(data=b"\x89PNG" + bytes(1_200_000))] * 2), INVALID,
         "images"),
    case("captioner-too-many-items", "captioner", "Caption",
         captioner_pb2.CaptionRequest(items=[captioner_pb2.CaptionItem(image=ref(data=b"x"))] * 257), INVALID,
         "items"),
    case("safety-too-many-items", "safety", "Check",
         safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(caption="a")] * 257), INVALID, "items"),
    case("sampler-prompt-over-length-cap", "sampler", "Generate", generate(prompt="p" * 8193), INVALID, "prompt"),
    case("sampler-too-many-style-clusters", "sampler", "Generate",
         generate(tags=sampler_pb2.PromptTags(style_clusters=range(300))), INVALID, "tags.style_clusters"),
    case("sampler-num-images-huge", "sampler", "Generate", generate(num_images=1_000_000), INVALID, "num_images"),
    case("sampler-width-huge", "sampler", "Generate", generate(width=1 << 20), INVALID, "width"),
    case("sampler-steps-huge", "sampler", "Generate", generate(steps=1_000_000), INVALID, "steps"),
    # --- Unicode disguises of blocked tags: normalised before the rules ---
    case("safety-zero-width-blocked-tag", "safety", "Check", check(tags=["lo\u200bli"]), OK, verdict=blocked),
    case("safety-fullwidth-blocked-tag", "safety", "Check", check(tags=["\uff4c\uff4f\uff4c\uff49"]), OK,
         verdict=blocked),
    case("safety-cyrillic-confusable-blocked-tag", "safety", "Check", check(tags=["l\u043eli"]), OK, verdict=blocked),
    case("safety-soft-hyphen-blocked-tag", "safety", "Check", check(tags=["sho\u00adta"]), OK, verdict=blocked),
    case("safety-bidi-control-in-caption-tag-list", "safety", "Check",
         check(caption="score_9, sh\u202do\u202cta, solo"), OK, verdict=blocked),
    case("sampler-zero-width-blocked-prompt", "sampler", "Generate", generate(prompt="score_9, lo\u200bli, solo"), OK,
         verdict=all_images_blocked),
    # --- wrong enum values and negative counts ---
    case("captioner-negative-max-new-tokens", "captioner", "Caption",
         captioner_pb2.CaptionRequest(items=caption().items, max_new_tokens=-1), INVALID, "max_new_tokens"),
    case("captioner-unknown-kind", "captioner", "Caption", caption(kinds=[99]), INVALID, "items[0].kinds[0]"),
    case("scorer-fit-head-negative-epochs", "scorer", "FitHead", scorer_pb2.FitHeadRequest(epochs=-1), INVALID,
         "epochs"),
    case("scorer-fit-head-negative-holdout", "scorer", "FitHead", scorer_pb2.FitHeadRequest(holdout_fraction=-0.5),
         INVALID, "holdout_fraction"),
    case("scorer-embedding-nan", "scorer", "ScoreEmbeddings",
         scorer_pb2.ScoreEmbeddingsRequest(embeddings=[common_pb2.Embedding(values=[float("nan")] * 768)]), INVALID,
         "embeddings[0]"),
    case("style-tagger-fit-negative-k", "style-tagger", "FitClusters", style_tagger_pb2.FitClustersRequest(k=-1),
         INVALID, "k"),
    case("style-tagger-similar-negative-k", "style-tagger", "SimilarStyles",
         style_tagger_pb2.SimilarStylesRequest(cluster_id=0, k=-5), INVALID, "k"),
    case("style-tagger-palette-negative-colors", "style-tagger", "Palette",
         style_tagger_pb2.PaletteRequest(images=[ref(data=png())], colors=-3), INVALID, "colors"),
    case("trainer-list-runs-unknown-state", "trainer", "ListRuns", trainer_pb2.ListRunsRequest(states=[42]), INVALID,
         "states[0]"),
    case("trainer-list-runs-huge-page-size", "trainer", "ListRuns", trainer_pb2.ListRunsRequest(page_size=5000),
         INVALID, "page_size"),
    case("trainer-get-run-empty", "trainer", "GetRun", trainer_pb2.GetRunRequest(), INVALID, "run_id"),
    case("trainer-cancel-unknown-run", "trainer", "CancelRun",
         trainer_pb2.CancelRunRequest(run_id="no-such-run", propagation=7), NOT_FOUND),
    case("sampler-unknown-rating", "sampler", "Generate", generate(tags=sampler_pb2.PromptTags(rating=42)), INVALID,
         "tags.rating"),
    case("sampler-score-tag-out-of-range", "sampler", "Generate", generate(tags=sampler_pb2.PromptTags(score=99)),
         INVALID, "tags.score"),
    case("sampler-negative-seed", "sampler", "Generate", generate(seed=-1), INVALID, "seed"),
    case("sampler-nan-guidance", "sampler", "Generate", generate(guidance=float("nan")), INVALID, "guidance"),
    case("sampler-watch-job-negative-event", "sampler", "WatchJob",
         sampler_pb2.WatchJobRequest(job_id="no-such-job", after_event_id=-1), INVALID, "after_event_id"),
    case("sampler-get-unknown-job", "sampler", "GetJob", sampler_pb2.GetJobRequest(job_id="no-such-job"), NOT_FOUND),
    # --- tokens and roles ---
    case("captioner-no-token", "captioner", "Caption", caption(), UNAUTHENTICATED, token=""),
    case("safety-wrong-token", "safety", "Check", check(caption="a"), UNAUTHENTICATED, token="not-a-token"),
    case("trainer-huge-token", "trainer", "ListRuns", trainer_pb2.ListRunsRequest(), UNAUTHENTICATED,
         token=X * 6000),
    case("scorer-fit-head-generate-role", "scorer", "FitHead", scorer_pb2.FitHeadRequest(), DENIED,
         token=GENERATE_TOKEN),
    case("style-tagger-fit-clusters-worker-role", "style-tagger", "FitClusters",
         style_tagger_pb2.FitClustersRequest(), DENIED, token=WORKER_TOKEN),
    case("trainer-submit-run-worker-role", "trainer", "SubmitRun", spec_yaml(), DENIED, token=WORKER_TOKEN),
    case("scorer-garbage-bytes-without-token", "scorer", "Score", GARBAGE, UNAUTHENTICATED, token=""),
    case("sampler-no-token", "sampler", "Generate", generate(), UNAUTHENTICATED, token=""),
    case("sampler-wrong-token", "sampler", "LoadVersion", sampler_pb2.LoadVersionRequest(uri="/etc"),
         UNAUTHENTICATED, token="guess"),
]  # fmt: skip


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, Any]
    responses: list[bytes]


def _method(case: Case) -> tuple[str, Any]:
    """The full method path and its descriptor."""
    path = case.method if case.method.startswith("/") else f"/{SERVICES[case.service]}/{case.method}"
    service, _, name = path.lstrip("/").rpartition("/")
    return path, descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]


def _payload(request: Request, battery: Battery) -> bytes:
    if callable(request):
        request = request(battery)
    return request if isinstance(request, bytes) else request.SerializeToString()


def _call(battery: Battery, case: Case, request: Request) -> Answer:
    target = battery.targets[case.service]
    path, method = _method(case)
    token = target.token if case.token is None else case.token
    metadata = ((("authorization", f"Bearer {token}"),) if token else ()) + case.metadata
    payload = _payload(request, battery)
    try:
        if method.server_streaming:
            call = target.channel.unary_stream(path)(payload, metadata=metadata, timeout=CALL_TIMEOUT_S)
            responses = list(call)
        else:
            response, call = target.channel.unary_unary(path).with_call(
                payload, metadata=metadata, timeout=CALL_TIMEOUT_S
            )
            responses = [response]
        return Answer(call.code(), call.details() or "", dict(call.trailing_metadata() or ()), responses)
    except grpc.RpcError as err:
        return Answer(err.code(), err.details() or "", dict(err.trailing_metadata() or ()), [])  # type: ignore[attr-defined]


def _response(case: Case, raw: bytes) -> Any:
    _, method = _method(case)
    return message_factory.GetMessageClass(method.output_type).FromString(raw)


def _problems_with_message(text: str, where: str) -> list[str]:
    problems = []
    if len(text.encode()) >= MAX_MESSAGE_BYTES:
        problems.append(f"{where} is {len(text.encode())} bytes (the bound is {MAX_MESSAGE_BYTES})")
    leak = LEAKS.search(text)
    if leak:
        problems.append(f"{where} shows internals ({leak.group()!r}): {text[:300]!r}")
    return problems


def _serving(battery: Battery, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(battery.targets[service].channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=30).status  # no token: open


def _paths(request: Request, battery: Battery) -> list[str]:
    """The references a request names (to compare a twin's answer with the path left out)."""
    text = _payload(request, battery).decode("utf-8", "replace")
    return re.findall(r"(?:file://)?(?:(?:\.\./)+|/)etc(?:/[\w.-]+)*", text)


def _neutral(text: str, paths: list[str]) -> str:
    for path in sorted(paths, key=len, reverse=True):
        text = text.replace(path, "<ref>")
    return text


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_gets_a_named_status_and_the_service_keeps_serving(case: Case, battery: Battery) -> None:
    answer = _call(battery, case, case.request)
    problems: list[str] = []
    if answer.code is not case.code:
        problems.append(f"status {answer.code.name} ({answer.details[:300]!r}); wanted {case.code.name}")
    if answer.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        problems.append(f"{answer.code.name} is never an answer to bad input")
    problems += _problems_with_message(answer.details, "the status message")
    trailer_bytes = sum(len(k) + len(v) for k, v in answer.trailers.items())
    if trailer_bytes >= MAX_TRAILER_BYTES:
        problems.append(f"the trailers are {trailer_bytes} bytes (the bound is {MAX_TRAILER_BYTES})")
    if len(answer.trailers.get("x-request-id", "")) > 128:
        problems.append("the caller's over-long x-request-id is echoed back")
    if answer.code is case.code is INVALID:
        if case.field not in answer.details:
            problems.append(f"the message does not name {case.field!r}: {answer.details[:300]!r}")
        raw = answer.trailers.get("grpc-status-details-bin")
        if raw:
            violations = []
            for detail in status_pb2.Status.FromString(raw).details:
                bad_request = error_details_pb2.BadRequest()
                if detail.Unpack(bad_request):
                    violations += [v.field for v in bad_request.field_violations]
            named = violations[0] if violations else case.field
            if named != case.field and not (named.endswith("\u2026") and named.startswith(case.field)):
                problems.append(f"the BadRequest detail names {violations[0]!r}, not {case.field!r}")
    if answer.code is case.code is OK and answer.responses:
        response = _response(case, answer.responses[-1])
        if case.verdict is not None:
            wrong = case.verdict(response)
            if wrong:
                problems.append(wrong)
        elif case.field:
            error = response.results[0].error
            if error.field != case.field:
                problems.append(f"results[0].error names {error.field!r} ({error.message[:300]!r}), not {case.field!r}")
            problems += _problems_with_message(error.message, "results[0].error.message")
    if case.twin is not None:
        twin = _call(battery, case, case.twin)
        ours = _neutral(answer.details, _paths(case.request, battery))
        theirs = _neutral(twin.details, _paths(case.twin, battery))
        if (twin.code, theirs) != (answer.code, ours):
            problems.append(f"tells an existing file from a missing one: {ours[:200]!r} vs {theirs[:200]!r}")
        if answer.code is OK and answer.responses and twin.responses:
            a = _response(case, answer.responses[-1]).results[0].error.message
            b = _response(case, twin.responses[-1]).results[0].error.message
            if _neutral(a, _paths(case.request, battery)) != _neutral(b, _paths(case.twin, battery)):
                problems.append(f"tells an existing file from a missing one: {a[:200]!r} vs {b[:200]!r}")
    status = _serving(battery, case.service)
    if status != health_pb2.HealthCheckResponse.SERVING:
        problems.append(f"the service is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} afterwards")
    assert not problems, "; ".join(problems)


def test_the_battery_covers_every_service_with_at_least_sixty_cases() -> None:
    cases = [p.values[0] for p in CASES]
    assert len(cases) >= 60
    assert {c.service for c in cases} == set(SERVICES)
    assert len({p.id for p in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("check", "value", "accepted"),
    [
        pytest.param(check_id, "0f" * 32, True, id="id-sha256"),
        pytest.param(check_id, "tiny-1a2b3c4d", True, id="id-run"),
        pytest.param(check_id, "", True, id="id-empty-optional"),
        pytest.param(check_id, "é-ü-名前", True, id="id-non-ascii-letters"),
        pytest.param(check_id, "a\x00b", False, id="id-nul"),
        pytest.param(check_id, "a\nb", False, id="id-newline"),
        pytest.param(check_id, "a\x7fb", False, id="id-del"),
        pytest.param(check_id, "a\x85b", False, id="id-c1-control"),
        pytest.param(check_id, "a\u200bb", False, id="id-zero-width"),
        pytest.param(check_id, "a\u202eb", False, id="id-bidi-override"),
        pytest.param(check_id, "a" * ID_MAX, True, id="id-at-limit"),
        pytest.param(check_id, "a" * (ID_MAX + 1), False, id="id-over-limit"),
        pytest.param(check_text, "line one\nline two\ttab\r\n", True, id="text-multiline"),
        pytest.param(check_text, "lo\u200bli", True, id="text-zero-width-left-to-normalisation"),
        pytest.param(check_text, "a\x00b", False, id="text-nul"),
        pytest.param(check_text, "\x1b[31mred", False, id="text-terminal-escape"),
        pytest.param(check_names, ["pony", "solo"], True, id="names-plain"),
        pytest.param(check_names, ["pony", "two\nlines"], False, id="names-newline"),
        pytest.param(check_names, ["pony", "x" * (NAME_MAX + 1)], False, id="names-over-limit"),
    ],
)
def test_field_checks_refuse_control_characters_and_over_long_values(
    check: Callable[[Any, str], Any], value: Any, accepted: bool
) -> None:
    if accepted:
        check(value, "field")
        return
    with pytest.raises(InvalidArgument) as err:
        check(value, "field")
    assert err.value.field.startswith("field")
    assert "\x00" not in err.value.message and len(err.value.message) < 200  # never echoes the value


def test_status_messages_are_cut_to_a_bound_with_an_ellipsis() -> None:
    code, message = status_for(InvalidArgument("uri", "no such image: /" + "\u00e9" * 100_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode()) <= MAX_DETAILS_BYTES and message.startswith("uri: no such image: /")
    assert message.endswith("\u2026")
    assert status_for(InvalidArgument("uri", "short"))[1] == "uri: short"
    raw = status_details(InvalidArgument("f" * 10_000, "x" * 10_000), code, message)
    assert raw is not None
    bad_request = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(raw).details[0].Unpack(bad_request)
    violation = bad_request.field_violations[0]
    assert len(violation.field.encode()) <= 256 and len(violation.description.encode()) <= MAX_DETAILS_BYTES
