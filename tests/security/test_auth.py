"""Authentication and roles against real servers: no or a wrong token is UNAUTHENTICATED, a token below the method's
role is PERMISSION_DENIED (and changes nothing), a high enough one passes, health and reflection stay open, every
method of every service declares its role, and a server off loopback refuses to start without tokens."""

from __future__ import annotations

import importlib
import os
import pkgutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import pony.v1
from pony.v1 import sampler_pb2, sampler_pb2_grpc, scorer_pb2, scorer_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from pony_common.config import ConfigError, Settings
from pony_common.grpc import reflection
from pony_common.grpc.app import service_definition
from pony_common.grpc.auth import Role, Tokens, client_token, is_loopback
from pony_common.grpc.client import channel
from pony_common.testing import ServerLoop, serve
from services.sampler.client import build_request
from services.trainer.client import TrainerClient
from tests.conftest import free_port
from tests.sampler_stack import SamplerStack

ROOT = Path(__file__).resolve().parents[2]
ADMIN, WORKER, GENERATE = "admin-token-0123", "worker-token-4567", "generate-token-89ab"
TOKENS = f"admin:{ADMIN},worker:{WORKER},generate:{GENERATE}"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call, *args, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call(*args, timeout=30, **kw)
    return err.value.code()


def outcome(call, request, token: str) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The status code of a call with `token`, OK included."""
    try:
        call(request, timeout=60, metadata=bearer(token))
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture
def trainer(settings: Settings) -> Iterator[tuple[Settings, str]]:
    """The trainer controller (local executor) with three role tokens, on a free localhost port."""
    from services.trainer.app import create_service

    settings = settings.replace(auth_tokens=TOKENS, trainer_executor="local")
    with serve(settings, create_service(settings)) as served:
        yield settings, served.address


# --- tokens and roles on a real server ---------------------------------------------------------------


def test_no_token_and_a_wrong_token_are_unauthenticated(trainer) -> None:
    _, address = trainer
    with grpc.insecure_channel(address) as ch:
        stub = trainer_pb2_grpc.TrainerControllerStub(ch)
        request = trainer_pb2.ListRunsRequest()
        assert code_of(stub.ListRuns, request) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.ListRuns, request, metadata=bearer("not-a-token")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(stub.ListRuns, request, metadata=(("authorization", f"Basic {ADMIN}"),)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # A token one character short of a real one is just as wrong.
        assert code_of(stub.ListRuns, request, metadata=bearer(ADMIN[:-1])) == grpc.StatusCode.UNAUTHENTICATED
        # A refused caller's bytes are never parsed: garbage is UNAUTHENTICATED, not a deserialisation error.
        raw = ch.unary_unary("/pony.v1.TrainerController/ListRuns")
        assert code_of(raw, b"\xff\xff\xff\xff not a protobuf") == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(raw, b"\xff\xff\xff\xff", metadata=bearer(GENERATE)) == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_below_the_methods_role_is_permission_denied_and_changes_nothing(trainer, tmp_path: Path) -> None:
    _, address = trainer
    spec = "name: denied\nmanifest: /nowhere/manifest.parquet\nstages: [{name: a, resolution: 32, steps: 1}]\n"
    with grpc.insecure_channel(address) as ch:
        stub = trainer_pb2_grpc.TrainerControllerStub(ch)
        submit = trainer_pb2.SubmitRunRequest(spec_yaml=spec, run_id="denied-run")
        cancel = trainer_pb2.CancelRunRequest(run_id="denied-run")
        for token in (GENERATE, WORKER):
            assert code_of(stub.SubmitRun, submit, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(stub.CancelRun, cancel, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
        # generate (app backends) may not read training runs either: that is the worker role.
        with pytest.raises(grpc.RpcError) as err:
            stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=30, metadata=bearer(GENERATE))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "worker" in err.value.details() and "generate" in err.value.details()
        # Nothing was submitted.
        assert list(stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=30, metadata=bearer(ADMIN)).runs) == []


def test_admin_passes_every_role_and_worker_passes_its_own(trainer) -> None:
    _, address = trainer
    with grpc.insecure_channel(address) as ch:
        stub = trainer_pb2_grpc.TrainerControllerStub(ch)
        # Past auth: the controller itself answers (no such run), for admin on an admin method.
        cancel = trainer_pb2.CancelRunRequest(run_id="no-such-run")
        assert code_of(stub.CancelRun, cancel, metadata=bearer(ADMIN)) == grpc.StatusCode.NOT_FOUND
        for token in (ADMIN, WORKER):
            assert stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=30, metadata=bearer(token)).runs == []


def test_clients_send_the_token_of_their_settings(trainer, tmp_path: Path) -> None:
    settings, address = trainer
    token_file = tmp_path / "worker"
    token_file.write_text(WORKER + "\n")  # a mounted Secret key ends in a newline more often than not
    as_worker = settings.replace(auth_tokens="", client_token_file=str(token_file))
    assert client_token(as_worker) == WORKER
    assert TrainerClient(as_worker, address).list_runs().runs == []
    as_generate = settings.replace(auth_tokens="", client_token=GENERATE)
    with pytest.raises(grpc.RpcError) as err:
        TrainerClient(as_generate, address).list_runs()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The legacy PONY_AUTH_TOKEN is an admin token on both sides.
    legacy = settings.replace(auth_tokens=f"worker:{WORKER}", auth_token=ADMIN)
    assert Tokens.from_settings(legacy).role_of(ADMIN) is Role.ADMIN
    with channel(legacy, address) as ch:
        cancel = trainer_pb2.CancelRunRequest(run_id="no-such-run")
        assert code_of(trainer_pb2_grpc.TrainerControllerStub(ch).CancelRun, cancel) == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_stay_open_without_a_token(trainer) -> None:
    _, address = trainer
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("liveness", "readiness", "pony.v1.TrainerController"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        listed = next(
            reflection.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        assert "pony.v1.TrainerController" in {s.name for s in listed.list_services_response.service}


def test_over_tls_the_token_travels_as_call_credentials_and_the_health_port_stays_open(
    settings: Settings, tmp_path: Path
) -> None:
    """The prod path: TLS on the service port, the client's token as call credentials, kubelet probes on the
    plaintext health-only port without a token."""
    from services.trainer.app import create_service
    from tests.foundation.test_grpc_server import make_cert

    key, cert = make_cert(tmp_path)
    settings = settings.replace(
        auth_tokens=TOKENS, tls_cert=str(cert), tls_key=str(key), tls_ca=str(cert), health_port=free_port()
    )
    with serve(settings, create_service(settings)) as served:
        address = f"localhost:{served.port}"
        assert TrainerClient(settings.replace(client_token=WORKER), address).list_runs().runs == []
        with pytest.raises(grpc.RpcError) as err:
            TrainerClient(settings.replace(client_token=GENERATE), address).list_runs()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with channel(settings, address) as ch:  # TLS, no token
            stub = trainer_pb2_grpc.TrainerControllerStub(ch)
            assert code_of(stub.ListRuns, trainer_pb2.ListRunsRequest()) == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{served.running.health_port}") as ch:
            ready = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
            assert ready.status == health_pb2.HealthCheckResponse.SERVING


def test_scorer_fit_head_is_admin_only_and_preference_pairs_are_for_app_backends(model_settings: Settings) -> None:
    from services.scorer.app import create_service

    settings = model_settings.replace(auth_tokens=TOKENS)
    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as ch:
        stub = scorer_pb2_grpc.ScorerStub(ch)
        fit = scorer_pb2.FitHeadRequest()
        for token in (GENERATE, WORKER):
            assert code_of(stub.FitHead, fit, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
        # Past auth for admin: the scorer itself answers, an empty catalog has nothing to fit on.
        assert code_of(stub.FitHead, fit, metadata=bearer(ADMIN)) == grpc.StatusCode.FAILED_PRECONDITION
        # App backends ask for preference pairs but may not spend curation GPU time (Score is the worker role).
        score = scorer_pb2.ScoreRequest()
        assert code_of(stub.Score, score, metadata=bearer(GENERATE)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(stub.Score, score, metadata=bearer(WORKER)) == grpc.StatusCode.INVALID_ARGUMENT
        for token in (GENERATE, WORKER, ADMIN):  # worker and admin include generate
            assert outcome(stub.NextPair, scorer_pb2.NextPairRequest(rater="r1"), token) not in REFUSED, token


@pytest.mark.triton
def test_sampler_load_version_is_admin_only_and_generation_is_for_app_backends(
    sampler_stack: SamplerStack,  # the sampler tests' session stack (tests/security/conftest.py reuses it)
    tmp_path: Path,
) -> None:
    base = sampler_stack.settings.replace(triton_start=False, triton_url=sampler_stack.model.url, auth_tokens=TOKENS)
    running = sampler_stack.start_sampler(base)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = sampler_pb2_grpc.SamplerStub(ch)
            before = stub.ListVersions(sampler_pb2.ListVersionsRequest(), timeout=30, metadata=bearer(GENERATE))
            load = sampler_pb2.LoadVersionRequest(uri=str(tmp_path / "pipeline"))
            for token in (GENERATE, WORKER):
                assert code_of(stub.LoadVersion, load, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(stub.LoadVersion, load) == grpc.StatusCode.UNAUTHENTICATED
            promote = sampler_pb2.PromoteVersionRequest(version=999)
            discard = sampler_pb2.DiscardVersionRequest(version=999)
            for token in (GENERATE, WORKER):
                for method, req in ((stub.PromoteVersion, promote), (stub.DiscardVersion, discard)):
                    assert code_of(method, req, metadata=bearer(token)) == grpc.StatusCode.PERMISSION_DENIED
            # Past auth for admin: no such candidate.
            assert code_of(stub.PromoteVersion, promote, metadata=bearer(ADMIN)) == grpc.StatusCode.FAILED_PRECONDITION
            assert code_of(stub.DiscardVersion, discard, metadata=bearer(ADMIN)) == grpc.StatusCode.FAILED_PRECONDITION
            # Past auth for admin: the sampler itself refuses a folder that holds no pipeline.
            assert code_of(stub.LoadVersion, load, metadata=bearer(ADMIN)) not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.UNKNOWN,
            )
            after = stub.ListVersions(sampler_pb2.ListVersionsRequest(), timeout=30, metadata=bearer(GENERATE))
            assert after == before
            # An app backend's token generates.
            resp = stub.Generate(build_request("a pony", seed=1, steps=1), timeout=120, metadata=bearer(GENERATE))
            assert len(resp.images) == 1
    finally:
        sampler_stack.stop_server(running)


# --- where the tokens come from -----------------------------------------------------------------------


def test_tokens_come_from_the_setting_a_file_and_a_mounted_secret_folder(settings: Settings, tmp_path: Path) -> None:
    listed = tmp_path / "tokens"
    listed.write_text(f"admin:{ADMIN}\n\nworker: {WORKER}\n")
    tokens = Tokens.from_settings(settings.replace(auth_tokens_file=str(listed), auth_tokens=f"generate:{GENERATE}"))
    assert tokens.roles == {ADMIN: Role.ADMIN, WORKER: Role.WORKER, GENERATE: Role.GENERATE}
    # A Secret volume: one file per key (named by the role) plus kubelet's `..data` link and timestamped folder.
    secret = tmp_path / "secret"
    stamp = secret / "..2026_01_01_00_00_00.1"
    stamp.mkdir(parents=True)
    for role, token in (("admin", ADMIN), ("generate", GENERATE)):
        (stamp / role).write_text(token + "\n")
        (secret / role).symlink_to(Path(stamp.name) / role)
    (secret / "..data").symlink_to(stamp.name)
    tokens = Tokens.from_settings(settings.replace(auth_tokens_file=str(secret)))
    assert tokens.roles == {ADMIN: Role.ADMIN, GENERATE: Role.GENERATE}
    assert not Tokens.from_settings(settings)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"auth_tokens": "owner:abc"}, "PONY_AUTH_TOKENS: 'owner' is not a role; use one of generate, worker, admin"),
        ({"auth_tokens": "admin:"}, "PONY_AUTH_TOKENS: role admin has an empty token"),
        ({"auth_tokens": "abc"}, "PONY_AUTH_TOKENS: entries are role:token"),
        ({"auth_tokens": "admin:same,generate:same"}, "one token is given two roles"),
        ({"auth_tokens_file": "/no/such/tokens"}, "PONY_AUTH_TOKENS_FILE=/no/such/tokens: cannot read it"),
    ],
)
def test_unusable_token_settings_are_one_line_config_errors(settings: Settings, changes, expected) -> None:
    with pytest.raises(ConfigError) as err:
        Tokens.from_settings(settings.replace(**changes))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_empty_client_token_file_is_a_config_error(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ConfigError, match=r"PONY_CLIENT_TOKEN_FILE=.* has an empty token"):
        client_token(settings.replace(client_token_file=str(tmp_path / "token")))


# --- off loopback: credentials or no start --------------------------------------------------------------


def _non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(ip) else ip


def test_loopback_detection() -> None:
    for host in ("127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "[::]", "10.0.0.7", "pony.example", ""):
        assert not is_loopback(host), host


def test_serve_off_loopback_without_tokens_refuses_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PONY_")}
    env.update(PONY_STATE_DIR=str(tmp_path / "state"), PONY_BIND_HOST="0.0.0.0", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "pony_common.cli.main", "serve", "scorer", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"ponyctl serve: scorer refuses to listen on 0.0.0.0:{port} without credentials")
    assert "PONY_AUTH_TOKENS" in lines[0]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens


@pytest.mark.parametrize("host", ["0.0.0.0", "non-loopback-ip"])
def test_start_server_off_loopback_needs_tokens_and_serves_with_them(settings: Settings, host: str) -> None:
    from services.trainer.app import create_service

    if host == "non-loopback-ip":
        host = _non_loopback_ip() or pytest.skip("this machine has no non-loopback IPv4 address")
    with ServerLoop() as servers:
        with pytest.raises(ConfigError, match=f"refuses to listen on {host}:0 without credentials"):
            servers.start(settings, create_service(settings), host=host)
        secured = settings.replace(auth_tokens=f"worker:{WORKER}")
        running = servers.start(secured, create_service(secured), host=host)
        target = f"{'127.0.0.1' if host == '0.0.0.0' else host}:{running.port}"
        with grpc.insecure_channel(target) as ch:
            stub = trainer_pb2_grpc.TrainerControllerStub(ch)
            assert code_of(stub.ListRuns, trainer_pb2.ListRunsRequest()) == grpc.StatusCode.UNAUTHENTICATED
            assert stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=30, metadata=bearer(WORKER)).runs == []


def test_loopback_without_tokens_serves_without_auth(settings: Settings) -> None:
    """The demo and the tests: 127.0.0.1 and no tokens is allowed, and every call passes."""
    from services.trainer.app import create_service

    with serve(settings, create_service(settings)) as served, grpc.insecure_channel(served.address) as ch:
        cancel = trainer_pb2.CancelRunRequest(run_id="no-such-run")
        assert code_of(trainer_pb2_grpc.TrainerControllerStub(ch).CancelRun, cancel) == grpc.StatusCode.NOT_FOUND


# --- every method declares its role ---------------------------------------------------------------------


def _service_descriptors() -> dict[str, object]:
    """Every `pony.v1` service in the generated stubs, by full name."""
    found = {}
    for info in pkgutil.iter_modules(pony.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"pony.v1.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                found[service.full_name] = service
    return found


def _servicers() -> dict[str, type]:
    """Our servicer class of each `pony.v1` service: the subclass in services/*/servicer.py of the generated base."""
    import services

    for info in pkgutil.iter_modules(services.__path__):
        if (ROOT / "services" / info.name / "servicer.py").is_file():
            importlib.import_module(f"services.{info.name}.servicer")
    out: dict[str, type] = {}
    for full_name in _service_descriptors():
        name = full_name.rsplit(".", 1)[1]
        base = getattr(importlib.import_module(f"pony.v1.{_grpc_module(full_name)}"), f"{name}Servicer")
        ours = [c for c in base.__subclasses__() if c.__module__.startswith("services.")]
        assert len(ours) == 1, f"{full_name}: servicers {ours}"
        out[full_name] = ours[0]
    return out


def _grpc_module(full_name: str) -> str:
    service = _service_descriptors()[full_name]
    return Path(service.file.name).stem + "_pb2_grpc"  # type: ignore[attr-defined]


def test_every_method_of_every_service_declares_a_role() -> None:
    descriptors = _service_descriptors()
    assert {"pony.v1.Sampler", "pony.v1.Scorer", "pony.v1.TrainerController"} <= set(descriptors)
    servicers = _servicers()
    assert set(servicers) == set(descriptors)
    for full_name, servicer in servicers.items():
        methods = {m.name for m in descriptors[full_name].methods}  # type: ignore[attr-defined]
        roles = getattr(servicer, "ROLES", {})
        assert set(roles) == methods, f"{full_name}: methods without a role: {sorted(methods - set(roles))}"
        assert all(isinstance(role, Role) for role in roles.values()), full_name


def test_the_admin_methods_are_admin_only() -> None:
    servicers = _servicers()
    admin = {
        (full_name, method) for full_name, servicer in servicers.items() for method, role in servicer.ROLES.items()
        if role is Role.ADMIN
    }  # fmt: skip
    assert {
        ("pony.v1.Sampler", "LoadVersion"),
        ("pony.v1.Sampler", "PromoteVersion"),
        ("pony.v1.Sampler", "DiscardVersion"),
        ("pony.v1.Scorer", "FitHead"),
        ("pony.v1.StyleTagger", "FitClusters"),
        ("pony.v1.TrainerController", "SubmitRun"),
        ("pony.v1.TrainerController", "CancelRun"),
    } <= admin
    sampler = servicers["pony.v1.Sampler"].ROLES
    for method in ("Generate", "GenerateStream", "SubmitJob", "GetJob", "WatchJob", "CancelJob", "ListVersions"):
        assert sampler[method] is Role.GENERATE, method


def test_a_servicer_missing_a_role_does_not_build() -> None:
    class Partial(trainer_pb2_grpc.TrainerControllerServicer):
        ROLES = {"GetRun": Role.WORKER, "ListRuns": Role.WORKER, "SubmitRun": Role.ADMIN, "CancelRun": Role.ADMIN,
                 "EvaluateStyleAdherence": Role.ADMIN, "GetEvaluation": Role.WORKER}  # fmt: skip

    with pytest.raises(ValueError, match=r"pony.v1.TrainerController: .*without one: \['WatchRun'\]"):
        service_definition(
            "trainer", "pony.v1.TrainerController", trainer_pb2_grpc.add_TrainerControllerServicer_to_server, Partial()
        )
