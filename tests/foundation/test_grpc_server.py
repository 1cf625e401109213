"""The gRPC bootstrap every service uses: health (that tells the truth about the model, and retries a failed load),
reflection (v1 and v1alpha), error mapping (with google.rpc.BadRequest details), auth, limits, retries, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from pony.v1 import common_pb2, scorer_pb2, scorer_pb2_grpc
from pony_common.config import ConfigError, Settings
from pony_common.grpc import reflection as reflection_v1
from pony_common.grpc.client import channel
from pony_common.grpc.server import RunningServer, ServiceDefinition
from pony_common.models.sources import ModelNotFoundError
from pony_common.testing import ServerLoop
from tests.conftest import free_port
from tests.foundation.echo_service import create_service
from tests.samples import png_bytes

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def score(stub: scorer_pb2_grpc.ScorerStub, uri: str, **kw: object) -> scorer_pb2.ScoreResponse:
    return stub.Score(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri=uri)]), timeout=10, **kw)


def run_server(settings: Settings, gate: threading.Event | None = None):
    """Starts the echo service on a free port in a background event loop; returns (port, stop, loop, running)."""
    servers = ServerLoop()
    running = servers.start(settings, create_service(settings, gate), wait_ready=False)
    return running.port, servers.close, servers.loop, running


@pytest.fixture
def server(settings: Settings):
    port, stop, _, _ = run_server(settings)
    try:
        yield port
    finally:
        stop()


def health_status(ch: grpc.Channel, name: str) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def statuses(ch: grpc.Channel, *names: str) -> dict[str, int]:
    return {name: health_status(ch, name) for name in names}


def test_health_reports_liveness_and_readiness_after_model_load(settings: Settings) -> None:
    gate = threading.Event()
    port, stop, _, _ = run_server(settings, gate)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            def status(name: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

            # Overall and each service's own name are serving only once the model is: they say what readiness says.
            assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("pony.v1.Scorer") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
            assert status("readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            gate.set()
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert status("readiness") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.SERVING
            assert status("pony.v1.Scorer") == health_pb2.HealthCheckResponse.SERVING
            assert status("liveness") == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                status("no.such.Service")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        gate.set()
        stop()


def test_reflection_lists_the_services(server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"pony.v1.Scorer", "grpc.health.v1.Health"} <= names


def test_reflection_v1_lists_the_services_and_describes_them(server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        stub = reflection_v1.ServerReflectionStub(ch)
        requests = [
            reflection_v1.ServerReflectionRequest(list_services=""),
            reflection_v1.ServerReflectionRequest(file_containing_symbol="pony.v1.Scorer"),
            reflection_v1.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        ]
        listed, scorer, itself = stub.ServerReflectionInfo(iter(requests), timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {"pony.v1.Scorer", "pony.v1.Captioner", "grpc.health.v1.Health"} <= names
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names

    def files(response: object) -> dict[str, descriptor_pb2.FileDescriptorProto]:
        protos = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in response.file_descriptor_response.file_descriptor_proto
        ]
        return {p.name: p for p in protos}

    described = files(scorer)
    assert "Scorer" in [s.name for p in described.values() if p.package == "pony.v1" for s in p.service]
    (v1,) = [p for p in files(itself).values() if p.package == "grpc.reflection.v1"]
    assert [m.name for m in v1.service[0].method] == ["ServerReflectionInfo"]


def test_buf_curl_lists_the_methods_over_reflection_v1(server: int) -> None:
    buf = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    if not Path(buf).exists():
        pytest.fail("buf is not installed (the buf-bin package is in requirements.txt)")
    # --reflect-protocol grpc-v1: v1 only, no fallback to v1alpha.
    out = subprocess.run(
        [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1",
         "--list-methods", f"http://127.0.0.1:{server}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "pony.v1.Scorer/Score" in out.stdout.split()


@pytest.mark.parametrize(
    ("uri", "code", "fragment"),
    [
        ("overload", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many"),
        ("down", grpc.StatusCode.UNAVAILABLE, "database is down"),
        ("boom", grpc.StatusCode.INTERNAL, "internal error"),
    ],
)
def test_domain_errors_arrive_as_status_codes(server: int, uri: str, code: grpc.StatusCode, fragment: str) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch, pytest.raises(grpc.RpcError) as err:
        score(scorer_pb2_grpc.ScorerStub(ch), uri)
    assert err.value.code() == code
    assert fragment in err.value.details()
    assert "hunter2" not in err.value.details()


def test_invalid_argument_names_the_field_and_carries_a_request_id(server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        stub = scorer_pb2_grpc.ScorerStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(scorer_pb2.ScoreRequest(), timeout=5, metadata=(("x-request-id", "req-123"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("images:")
    assert ("x-request-id", "req-123") in tuple(err.value.initial_metadata())


def test_invalid_argument_carries_bad_request_details_naming_the_field(server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch, pytest.raises(grpc.RpcError) as err:
        scorer_pb2_grpc.ScorerStub(ch).Score(scorer_pb2.ScoreRequest(), timeout=5)
    status = rpc_status.from_call(err.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == err.value.details()
    (detail,) = status.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("images", "at least one image is required")]
    # The request id still travels in the trailers beside the details.
    assert "x-request-id" in dict(err.value.trailing_metadata())


def test_other_errors_carry_no_bad_request_details(server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch, pytest.raises(grpc.RpcError) as err:
        score(scorer_pb2_grpc.ScorerStub(ch), "down")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rpc_status.from_call(err.value) is None


def test_bearer_auth_rejects_missing_and_wrong_tokens_but_not_health(settings: Settings) -> None:
    settings = settings.replace(auth_token="s3cret")
    port, stop, _, _ = run_server(settings)
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as ch:
            stub = scorer_pb2_grpc.ScorerStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                score(stub, "x")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                score(stub, "x", metadata=(("authorization", "Bearer wrong"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == 1
        with channel(settings, address) as ch:  # the client factory adds the token
            assert score(scorer_pb2_grpc.ScorerStub(ch), "ok").results[0].image_id == "ok"
    finally:
        stop()


def test_message_size_limit_is_enforced(settings: Settings) -> None:
    settings = settings.replace(max_message_mb=1)
    port, stop, _, _ = run_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            big = scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=b"\0" * (2 * 1024 * 1024))])
            with pytest.raises(grpc.RpcError) as err:
                scorer_pb2_grpc.ScorerStub(ch).Score(big, timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop()


def test_client_retries_unavailable_until_the_server_is_up(settings: Settings) -> None:
    port = free_port()
    settings = settings.replace(scorer_addr=f"127.0.0.1:{port}", rpc_retries=5)
    started: list = []

    def start_later() -> None:
        time.sleep(0.4)
        servers = ServerLoop()
        servers.start(settings, create_service(settings), port=port, wait_ready=False)
        started.append(servers)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with channel(settings, "scorer") as ch:
            assert score(scorer_pb2_grpc.ScorerStub(ch), "late").results[0].image_id == "late"
    finally:
        t.join()
        for servers in started:
            servers.close()


def test_sigterm_drains_the_in_flight_call_then_stops() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.foundation.echo_service", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = scorer_pb2_grpc.ScorerStub(ch)
            slow = stub.Score.future(scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(uri="slow:1.5")]), timeout=20)
            time.sleep(0.5)  # the call is in flight
            proc.send_signal(signal.SIGTERM)
            assert slow.result().results[0].image_id == "slow:1.5"
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def make_cert(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "tls.key", folder / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return key, cert


def test_tls_server_with_a_plaintext_health_port_for_probes(settings: Settings, tmp_path: Path) -> None:
    key, cert = make_cert(tmp_path)
    health_port = free_port()
    settings = settings.replace(tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert), health_port=health_port)
    port, stop, _, running = run_server(settings)
    try:
        with channel(settings, f"localhost:{port}") as ch:
            assert score(scorer_pb2_grpc.ScorerStub(ch), "tls").results[0].image_id == "tls"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.RpcError):
            score(scorer_pb2_grpc.ScorerStub(ch), "plain")
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == 1
            with pytest.raises(grpc.RpcError) as err:
                score(scorer_pb2_grpc.ScorerStub(ch), "not here")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        stop()


def test_a_client_cancelling_a_stream_is_not_a_server_error(server: int, caplog: pytest.LogCaptureFixture) -> None:
    from pony.v1 import captioner_pb2, captioner_pb2_grpc

    items = [captioner_pb2.CaptionItem(item_id=str(i)) for i in range(64)]
    with grpc.insecure_channel(f"127.0.0.1:{server}") as ch:
        call = captioner_pb2_grpc.CaptionerStub(ch).CaptionStream(
            captioner_pb2.CaptionStreamRequest(items=items), timeout=30
        )
        assert next(call).result.item_id == "0"
        call.cancel()
        time.sleep(0.6)  # the server notices the cancellation at its next yield
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_scorer(servers: ServerLoop, settings: Settings) -> RunningServer:
    from services.scorer.app import create_service as create_scorer

    return servers.start(settings, create_scorer(settings), wait_ready=False)


def test_a_missing_model_is_retried_not_ready_but_live_and_a_model_that_appears_is_picked_up(
    settings: Settings, tiny_models: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models / "heads", models / "heads")  # the head is there, the CLIP folder is not (yet)
    settings = settings.replace(models_dir=str(models), model_load_attempts=1000, model_load_backoff_s=0.2)
    with ServerLoop() as servers:
        running = start_scorer(servers, settings)
        wait_until(lambda: running.load_error is not None, "the first load to fail")
        assert isinstance(running.load_error, ModelNotFoundError)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            # Retrying (999 tries left): not ready, not serving overall, but alive (no restart would help yet).
            assert statuses(ch, "", "readiness", "pony.v1.Scorer", "liveness") == {
                "": NOT_SERVING, "readiness": NOT_SERVING, "pony.v1.Scorer": NOT_SERVING, "liveness": SERVING,
            }  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                score(scorer_pb2_grpc.ScorerStub(ch), "x")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # The folder appears (as a volume finishing its sync would): a later try loads it.
            shutil.copytree(tiny_models / "clip", models / ".clip-incoming")
            (models / ".clip-incoming").rename(models / "clip")
            servers.run(running.wait_ready(120), 130)
            assert running.load_attempts >= 2 and running.load_error is None
            assert set(statuses(ch, "", "readiness", "pony.v1.Scorer", "liveness").values()) == {SERVING}
            scored = scorer_pb2_grpc.ScorerStub(ch).Score(
                scorer_pb2.ScoreRequest(images=[common_pb2.ImageRef(data=png_bytes((200, 40, 40)))]), timeout=60
            )
            assert scored.results[0].score_tag.startswith("score_")


def test_a_model_that_never_loads_fails_liveness_once_the_tries_are_spent(settings: Settings, tmp_path: Path) -> None:
    models = tmp_path / "models"
    settings = settings.replace(models_dir=str(models), model_load_attempts=3, model_load_backoff_s=0.05)
    with ServerLoop() as servers:
        running = start_scorer(servers, settings)
        with pytest.raises(ModelNotFoundError) as err:
            servers.run(running.wait_ready(120), 130)
        assert running.load_attempts == 3
        # One line naming the path and the fix, not the hub's "Repo id must be in the form ...".
        message = str(err.value)
        assert str(models / "clip") in message and f"ponyctl models tiny {models}" in message, message
        assert "PONY_SCORER_MODEL" in message and "Repo id" not in message
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert set(statuses(ch, "", "readiness", "pony.v1.Scorer", "liveness").values()) == {NOT_SERVING}


def test_an_unusable_setting_is_not_retried(settings: Settings) -> None:
    tries: list[int] = []

    def load() -> None:
        tries.append(1)
        raise ConfigError("PONY_STYLE_TAG_FORMAT: no {n} in it")

    definition = ServiceDefinition("scorer", ["pony.v1.Scorer"], register=lambda server: None, load=load)
    settings = settings.replace(model_load_attempts=5, model_load_backoff_s=0.05)
    with ServerLoop() as servers:
        running = servers.start(settings, definition, wait_ready=False)
        with pytest.raises(ConfigError):
            servers.run(running.wait_ready(60), 70)
        assert tries == [1]
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert health_status(ch, "liveness") == NOT_SERVING
