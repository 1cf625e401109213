"""Red-team probes against the real services on loopback (the battery's stack, without the sampler): bearer header
spellings (two `authorization` headers among them), every lesser token on every method its role does not reach
(from the servicers' ROLES tables), a NUL byte in every string field the request descriptors declare, prompt-syntax
and letter-variant disguises of blocked tags through the real safety service, and image hosts that drip their
answer to hold a fetch past its deadline."""

from __future__ import annotations

import importlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pony.v1 import safety_pb2, sampler_pb2, sampler_pb2_grpc
from pony_common.access import Hosts, Roots, allowed_registries, fetch, image_allowed
from pony_common.errors import InvalidArgument
from pony_common.fields import NAME_MAX
from pony_common.grpc.auth import Role
from services.safety.codex import Codex, CodexCharacter
from services.safety.policy import Policy, SafetyInput
from services.safety.tag_rules import load_tag_rules
from services.stack.stack_thread import StackThread
from tests.sampler_stack import SamplerStack
from tests.security.conftest import ADMIN_TOKEN, GENERATE_TOKEN, WORKER_TOKEN

SERVICES = {
    "captioner": ("pony.v1.Captioner", "services.captioner.servicer"),
    "scorer": ("pony.v1.Scorer", "services.scorer.servicer"),
    "style-tagger": ("pony.v1.StyleTagger", "services.style_tagger.servicer"),
    "safety": ("pony.v1.Safety", "services.safety.servicer"),
    "trainer": ("pony.v1.TrainerController", "services.trainer.servicer"),
}
TIMEOUT_S = 120


def _roles(module: str) -> dict[str, Role]:
    mod = importlib.import_module(module)
    for value in vars(mod).values():
        table = getattr(value, "ROLES", None)
        if isinstance(table, dict) and table:
            return dict(table)
    raise AssertionError(f"{module} has no ROLES table")


@pytest.fixture(scope="module")
def channels(service_stack: StackThread) -> Iterator[dict[str, grpc.Channel]]:
    chans = {name: grpc.insecure_channel(f"127.0.0.1:{r.port}") for name, r in service_stack.running.items()}
    try:
        yield chans
    finally:
        for ch in chans.values():
            ch.close()


def _call(
    channel: grpc.Channel, path: str, payload: bytes, metadata: tuple
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    service, _, name = path.lstrip("/").rpartition("/")
    method = descriptor_pool.Default().FindServiceByName(service).methods_by_name[name]
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(payload, metadata=metadata, timeout=TIMEOUT_S)
            responses = list(call)
            return call.code(), call.details() or "", responses
        response, call = channel.unary_unary(path).with_call(payload, metadata=metadata, timeout=TIMEOUT_S)
        return call.code(), call.details() or "", [response]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []  # type: ignore[attr-defined]


def _serving(channel: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    status = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=30).status
    return status == health_pb2.HealthCheckResponse.SERVING


DENIED_CALLS = [
    (service, method, token_name)
    for service, (_, module) in SERVICES.items()
    for method, role in _roles(module).items()
    for token_name, token_role in (("generate", Role.GENERATE), ("worker", Role.WORKER))
    if not token_role.includes(role)
]
TOKENS = {"generate": GENERATE_TOKEN, "worker": WORKER_TOKEN}


@pytest.mark.parametrize(("service", "method", "token_name"), DENIED_CALLS)
def test_a_lesser_token_is_denied_every_method_above_its_role(
    channels: dict[str, grpc.Channel], service: str, method: str, token_name: str
) -> None:
    path = f"/{SERVICES[service][0]}/{method}"
    code, _, _ = _call(channels[service], path, b"", (("authorization", f"Bearer {TOKENS[token_name]}"),))
    assert code is grpc.StatusCode.PERMISSION_DENIED


HEADERS = {
    "no header": ((), grpc.StatusCode.UNAUTHENTICATED),
    "empty bearer": ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
    "bearer only": ((("authorization", "Bearer"),), grpc.StatusCode.UNAUTHENTICATED),
    "basic scheme": ((("authorization", f"Basic {ADMIN_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED),
    "token alone": ((("authorization", ADMIN_TOKEN),), grpc.StatusCode.UNAUTHENTICATED),
    "token prefix": ((("authorization", f"Bearer {ADMIN_TOKEN[:-1]}"),), grpc.StatusCode.UNAUTHENTICATED),
    "token plus": ((("authorization", f"Bearer {ADMIN_TOKEN}x"),), grpc.StatusCode.UNAUTHENTICATED),
    "two tokens": ((("authorization", f"Bearer {GENERATE_TOKEN} {ADMIN_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED),
    "other header": ((("x-authorization", f"Bearer {ADMIN_TOKEN}"),), grpc.StatusCode.UNAUTHENTICATED),
    "generate then admin": (
        (("authorization", f"Bearer {GENERATE_TOKEN}"), ("authorization", f"Bearer {ADMIN_TOKEN}")),
        grpc.StatusCode.UNAUTHENTICATED,  # two headers are ambiguous: refused, whichever comes last
    ),
    "admin then generate": (
        (("authorization", f"Bearer {ADMIN_TOKEN}"), ("authorization", f"Bearer {GENERATE_TOKEN}")),
        grpc.StatusCode.UNAUTHENTICATED,
    ),
}


@pytest.mark.parametrize("name", HEADERS)
def test_bearer_header_spellings_never_pass_an_admin_check(channels: dict[str, grpc.Channel], name: str) -> None:
    metadata, wanted = HEADERS[name]
    code, _, _ = _call(channels["scorer"], "/pony.v1.Scorer/FitHead", b"", metadata)
    assert code is wanted
    assert _serving(channels["scorer"])


@pytest.mark.parametrize("spelling", ["bearer", "BEARER", "Bearer  "])
def test_the_bearer_scheme_is_case_insensitive_and_spacing_tolerant(
    channels: dict[str, grpc.Channel], spelling: str
) -> None:
    # Not a hole: the scheme is case-insensitive (RFC 9110); the token itself must match exactly.
    code, _, _ = _call(
        channels["trainer"],
        "/pony.v1.TrainerController/ListRuns",
        b"",
        (("authorization", f"{spelling} {ADMIN_TOKEN}"),),
    )
    assert code is grpc.StatusCode.OK


def _string_paths(desc: Descriptor, prefix: str = "", depth: int = 0) -> Iterator[tuple[list[FieldDescriptor], str]]:
    for f in desc.fields:
        here = f"{prefix}{f.name}"
        if f.type == FieldDescriptor.TYPE_STRING:
            yield [f], here
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 2 and not f.message_type.GetOptions().map_entry:
            for chain, name in _string_paths(f.message_type, here + ".", depth + 1):
                yield [f, *chain], name


def _with_nul(desc: Descriptor, chain: list[FieldDescriptor]) -> bytes:
    msg = message_factory.GetMessageClass(desc)()
    node = msg
    for f in chain[:-1]:
        node = getattr(node, f.name).add() if f.label == FieldDescriptor.LABEL_REPEATED else getattr(node, f.name)
    last = chain[-1]
    if last.label == FieldDescriptor.LABEL_REPEATED:
        getattr(node, last.name).append("a\x00b")
    else:
        setattr(node, last.name, "a\x00b")
    return msg.SerializeToString()


NUL_CALLS = [
    (service, method.name, name)
    for service, (full, _) in SERVICES.items()
    for method in descriptor_pool.Default().FindServiceByName(full).methods
    for _, name in _string_paths(method.input_type)
]


@pytest.mark.parametrize(("service", "method", "field"), NUL_CALLS)
def test_a_nul_byte_in_any_string_field_is_a_named_status(
    channels: dict[str, grpc.Channel], service: str, method: str, field: str
) -> None:
    full = SERVICES[service][0]
    desc = descriptor_pool.Default().FindServiceByName(full).methods_by_name[method]
    chain = next(c for c, n in _string_paths(desc.input_type) if n == field)
    code, details, responses = _call(
        channels[service],
        f"/{full}/{method}",
        _with_nul(desc.input_type, chain),
        (("authorization", f"Bearer {ADMIN_TOKEN}"),),
    )
    named = _indexed(desc.input_type, field)
    if code is grpc.StatusCode.OK:
        # A per-item field: the call succeeds and the item's error names the field.
        out = message_factory.GetMessageClass(desc.output_type)
        errors = [str(out.FromString(r)) for r in responses]
        assert any(f'field: "{named}"' in text for text in errors), errors
    else:
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (code, details)
        assert code is grpc.StatusCode.FAILED_PRECONDITION or named in details, details
    assert _serving(channels[service])


def _indexed(desc: Descriptor, field: str) -> str:
    """`items.image.uri` as a message names it: `items[0].image.uri` (every repeated field at index 0)."""
    parts = []
    for name in field.split("."):
        f = desc.fields_by_name[name]
        parts.append(f"{name}[0]" if f.label == FieldDescriptor.LABEL_REPEATED else name)
        desc = f.message_type
    return ".".join(parts)


# --- blocked tags in prompt syntax and Latin letter variants, through the real safety service ---

DISGUISED = [
    "(loli:1.3)",  # a prompt weight
    "((loli))",  # emphasis
    "[loli]",
    "{loli}",
    "#loli",
    "loli!",
    "l.o.l.i",
    "(ｌｏｌｉ:１．５)",  # fullwidth inside weight syntax
    "(child_porn:1.2)",
    "łołi",  # L with stroke: no decomposition removes it
    "ɭoɭi",  # L with retroflex hook
    "ŀoŀi",  # L with middle dot (NFKC: `l·`)
    "ʟᴏʟɪ",  # small capitals
    "ⱡoⱡi",  # L with double bar
]
NOT_BLOCKED = ["(masterpiece:1.2)", "shot a", "(grape juice)", ":3", "^_^", "#cubism"]


def _check(channels: dict[str, grpc.Channel], tags: list[str], caption: str) -> safety_pb2.SafetyResult:
    stub = channels["safety"].unary_unary(
        "/pony.v1.Safety/Check",
        request_serializer=safety_pb2.CheckRequest.SerializeToString,
        response_deserializer=safety_pb2.CheckResponse.FromString,
    )
    request = safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(item_id="0", tags=tags, caption=caption)])
    response = stub(request, metadata=(("authorization", f"Bearer {WORKER_TOKEN}"),), timeout=TIMEOUT_S)
    assert not response.results[0].error.reason, response.results[0].error.message
    return response.results[0]


@pytest.mark.parametrize("tag", DISGUISED)
def test_a_disguised_blocked_tag_is_blocked_as_a_tag_and_inside_a_prompt(
    channels: dict[str, grpc.Channel], tag: str
) -> None:
    assert _check(channels, [tag], "").decision == safety_pb2.DECISION_BLOCK
    assert _check(channels, [], f"score_9, a pony, {tag}, meadow").decision == safety_pb2.DECISION_BLOCK


@pytest.mark.parametrize("text", NOT_BLOCKED)
def test_prompt_syntax_alone_blocks_nothing(channels: dict[str, grpc.Channel], text: str) -> None:
    assert _check(channels, [text], f"a pony, {text}").decision != safety_pb2.DECISION_BLOCK


# --- an image host that drips its answer ---


def _host(answer: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback HTTP host that answers every connection with `answer`; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(timeout=10)


def _drip(head: bytes, byte: bytes) -> Callable[[socket.socket], None]:
    """Sends `head`, then `byte` every 50 ms for up to 20 s (each well inside the socket timeout), then hangs up."""

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(head)
                for _ in range(400):
                    conn.sendall(byte)
                    time.sleep(0.05)  # the attacker's pace, not synchronisation
            except OSError:
                pass  # the client cut the connection: what the deadline should do

    return answer


DRIPS = {
    "header line": _drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),
    "body": _drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", b"a"),
}


@pytest.mark.parametrize("part", DRIPS)
def test_a_host_dripping_its_answer_is_cut_at_the_fetch_deadline(part: str) -> None:
    # Each byte comes well within the socket timeout, so only a deadline on the whole read stops the fetch; without
    # one it runs until the host hangs up and reports a broken answer instead of the deadline.
    for port in _host(DRIPS[part]):
        with pytest.raises(InvalidArgument) as refused:
            fetch(f"http://127.0.0.1:{port}/a.png", Hosts([f"127.0.0.1:{port}"]), "image.uri",
                  max_bytes=1_000_000, timeout_s=1.0, refused="refused")  # fmt: skip
        assert refused.value.field == "image.uri"
        assert "not read within 1 s (PONY_IMAGE_FETCH_TIMEOUT_S)" in str(refused.value)


# --- the sampler's prompt check, end to end (its session stack: real tritonserver and safety service) ---

LONG_SENTENCE = (
    "a small pony with a braided mane trots through a sunlit meadow of tall grass and wildflowers while swallows "
    "circle overhead and a wooden windmill turns slowly on the hill behind her under a sky of soft white clouds "
    "that drift toward the distant blue mountains at the end of a long summer afternoon"
)


def _generate(sampler_stack: SamplerStack, prompt: str) -> sampler_pb2.GenerateResponse:
    stub = sampler_pb2_grpc.SamplerStub(sampler_stack.channel())
    return stub.Generate(sampler_pb2.GenerateRequest(prompt=prompt, num_images=1, seed=7), timeout=TIMEOUT_S)


def test_a_long_prompt_without_commas_is_generated_not_refused(sampler_stack: SamplerStack) -> None:
    # The prompt check sends the prompt's comma pieces as tags; a piece longer than a tag may be must not turn the
    # safety service's field error into a refusal of an ordinary prompt.
    assert len(LONG_SENTENCE) > NAME_MAX
    response = _generate(sampler_stack, LONG_SENTENCE)
    assert len(response.images) == 1, [r.message for b in response.blocked for r in b.reasons]


def test_a_weighted_blocked_tag_in_a_prompt_is_refused_before_generating(sampler_stack: SamplerStack) -> None:
    response = _generate(sampler_stack, f"score_9, (ｌｏｌｉ:1.3), {LONG_SENTENCE}")
    assert not response.images and response.blocked
    assert any(r.rule_id == "tags.blocked" for b in response.blocked for r in b.reasons)


@pytest.mark.parametrize("scheme", ["FILE://", "File://", "file://"])
def test_load_version_with_a_file_url_in_any_case_is_a_named_status(sampler_stack: SamplerStack, scheme: str) -> None:
    # A path under the models folder that is not a pipeline: whatever the scheme's case, a clean refusal.
    folder = sampler_stack.settings.models_dir or "/"
    stub = sampler_pb2_grpc.SamplerStub(sampler_stack.channel())
    with pytest.raises(grpc.RpcError) as refused:
        stub.LoadVersion(sampler_pb2.LoadVersionRequest(uri=f"{scheme}{folder}/no-such-pipeline"), timeout=TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "uri" in (refused.value.details() or "")


@pytest.mark.parametrize(
    "image",
    [
        "ghcr.io/pony/trainer\n",  # `$` matches before a final newline
        "ghcr.io/pony/trainer:1@evil.io/x",  # a "digest" that is another reference
        "ghcr.io/pony/trainer@sha256:abc",  # a digest too short to be one
    ],
)
def test_a_container_image_with_a_forged_tail_is_not_allowed(image: str) -> None:
    registries = allowed_registries(["ghcr.io/pony"], "")
    assert image_allowed("ghcr.io/pony/trainer@sha256:" + "a" * 64, registries)
    assert not image_allowed(image, registries)


def test_a_chained_fsspec_url_is_not_under_a_url_prefix() -> None:
    roots = Roots(["s3://bucket/exports"])
    assert roots.confine("s3://bucket/exports/v1") == "s3://bucket/exports/v1"
    assert roots.confine("s3://bucket/exports/v1::file:///etc") is None


@pytest.mark.parametrize("size", [1_000, 6_000])  # under the 8 KiB soft limit, past which gRPC drops calls at random
def test_an_over_long_authorization_header_is_unauthenticated(channels: dict[str, grpc.Channel], size: int) -> None:
    metadata = (("authorization", "Bearer " + "t" * size),)
    code, details, _ = _call(channels["scorer"], "/pony.v1.Scorer/FitHead", b"", metadata)
    assert code is grpc.StatusCode.UNAUTHENTICATED, details
    assert _serving(channels["scorer"])


@pytest.mark.parametrize("tag", ["(Sweetie Belle:1.2)", "[[sweetie_belle]]", "#Sweetie Belle"])
def test_a_weighted_character_tag_is_still_the_codex_character(tag: str) -> None:
    minor = CodexCharacter("Sweetie Belle", ("Sweetie",), "My Little Pony", "minor")
    codex = Codex(1, (minor,))
    assert codex.lookup(tag) is minor
    verdict = Policy().decide(SafetyInput(tags=(tag, "rating_explicit")), None, codex, load_tag_rules())
    assert "codex.minor_explicit" in [r.rule_id for r in verdict.reasons]
