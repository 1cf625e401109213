"""What a caller can make a service read (pony_common.access), against the real running services: image references
are blob keys unless a path is under PONY_IMAGE_ROOTS or a URL on PONY_IMAGE_HOSTS (read capped, timed, redirects
kept on the list); LoadVersion loads only from the model roots; SubmitRun keeps spec paths under the trainer's roots
and images on its registries. A refusal reads the same whether or not the thing exists."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from pony.v1 import (
    captioner_pb2,
    captioner_pb2_grpc,
    common_pb2,
    safety_pb2,
    safety_pb2_grpc,
    scorer_pb2,
    scorer_pb2_grpc,
    style_tagger_pb2,
    style_tagger_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from pony_common.access import IMAGE_REFUSED, MODEL_REFUSED, export_root, runs_root
from pony_common.blobs import BlobStore, image_key
from pony_common.config import Settings
from pony_common.errors import InvalidArgument
from pony_common.grpc.client import channel
from pony_common.images import image_id
from pony_common.testing import serve
from services.stack.stack_thread import CURATION_SERVICES, StackThread
from services.trainer.spec import OUTSIDE_ROOTS, OUTSIDE_RUNS, confine_spec, parse_spec
from tests.sampler_stack import SamplerStack
from tests.samples import SERVING, png_bytes, readiness
from tests.trainer.conftest import tiny_spec

PNG = png_bytes((200, 30, 30))
CAP = 1_000_000  # the allowing scorer's PONY_IMAGE_MAX_BYTES
BIG_TOTAL = 512 * 1024 * 1024  # what /big would send if it were read whole
FETCH_TIMEOUT_S = 2.0


# --- a loopback image host -------------------------------------------------------------------------------------


@dataclass
class ImageHost:
    """http.server on a free loopback port: /img.png, /big (512 MiB streamed), /redirect-away (to `localhost`, not
    on any list), /redirect-here (to /img.png), /stall (headers, then nothing until `release`)."""

    server: ThreadingHTTPServer
    requested: list[str] = field(default_factory=list)
    big_sent: list[int] = field(default_factory=list)
    big_done: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"


def _handler(host: ImageHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            host.requested.append(self.path)
            if self.path in ("/img.png", "/redirect-target.png", "/pipeline/model_index.json"):
                self._send(PNG)
            elif self.path == "/redirect-away":
                self._redirect(f"http://localhost:{host.port}/redirect-target.png")
            elif self.path == "/redirect-here":
                self._redirect("/img.png")
            elif self.path == "/big":
                self._big()
            elif self.path == "/stall":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.flush()
                host.release.wait(60)
            else:
                self.send_error(404)

        def _send(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _big(self) -> None:
            """No Content-Length: the reader only finds out how big it is by reading."""
            sent = 0
            try:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                chunk = PNG + b"\x00" * (65536 - len(PNG))
                while sent < BIG_TOTAL:
                    self.wfile.write(chunk)
                    sent += len(chunk)
            except OSError:
                pass
            finally:
                host.big_sent.append(sent)
                host.big_done.set()

    return Handler


@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageHost]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    host = ImageHost(server)
    server.RequestHandlerClass = _handler(host)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="image-host", daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- services ------------------------------------------------------------------------------------------------


def state_settings(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path, name: str, **changes: Any) -> Settings:
    state = tmp_path_factory.mktemp(name) / "state"
    return Settings.from_env({}, state_dir=str(state), models_dir=str(tiny_models), log_json=False, **changes)


@pytest.fixture(scope="module")
def default_stack(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[StackThread]:
    """Captioner, scorer, style-tagger and safety with the default policy: blob keys and bytes only."""
    stack = StackThread(state_settings(tmp_path_factory, tiny_models, "default-policy"), CURATION_SERVICES)
    try:
        yield stack
    finally:
        stack.close()


@dataclass
class AllowingScorer:
    settings: Settings
    root: Path  # PONY_IMAGE_ROOTS
    outside: Path  # a folder next to it, not allowed
    channel: grpc.Channel
    stub: scorer_pb2_grpc.ScorerStub


@pytest.fixture(scope="module")
def allowing_scorer(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: Path, image_host: ImageHost
) -> Iterator[AllowingScorer]:
    """A scorer that may read files under one root and URLs from the loopback image host, capped at CAP bytes."""
    from services.scorer.app import create_service

    base = tmp_path_factory.mktemp("allowing")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    settings = state_settings(
        tmp_path_factory,
        tiny_models,
        "allowing-policy",
        image_roots=(str(root),),
        image_hosts=(image_host.host,),
        image_max_bytes=CAP,
        image_fetch_timeout_s=FETCH_TIMEOUT_S,
    )
    with serve(settings, create_service(settings)) as served, channel(settings, served.address) as ch:
        yield AllowingScorer(settings, root, outside, ch, scorer_pb2_grpc.ScorerStub(ch))


def _ref(uri: str) -> common_pb2.ImageRef:
    return common_pb2.ImageRef(uri=uri)


def _caption(ch: grpc.Channel, uri: str) -> common_pb2.ItemError:
    item = captioner_pb2.CaptionItem(image=_ref(uri), kinds=[captioner_pb2.CAPTION_KIND_SHORT])
    reply = captioner_pb2_grpc.CaptionerStub(ch).Caption(captioner_pb2.CaptionRequest(items=[item]), timeout=60)
    return reply.results[0].error


def _score(ch: grpc.Channel, uri: str) -> common_pb2.ItemError:
    reply = scorer_pb2_grpc.ScorerStub(ch).Score(scorer_pb2.ScoreRequest(images=[_ref(uri)]), timeout=60)
    return reply.results[0].error


def _style(ch: grpc.Channel, uri: str) -> common_pb2.ItemError:
    request = style_tagger_pb2.StyleTaggerEmbedRequest(images=[_ref(uri)])
    return style_tagger_pb2_grpc.StyleTaggerStub(ch).Embed(request, timeout=60).results[0].error


def _safety(ch: grpc.Channel, uri: str) -> common_pb2.ItemError:
    request = safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(image=_ref(uri))])
    return safety_pb2_grpc.SafetyStub(ch).Check(request, timeout=60).results[0].error


# service -> (how to send one ImageRef uri and get its item error, the field the error names)
READERS: dict[str, tuple[Callable[[grpc.Channel, str], common_pb2.ItemError], str]] = {
    "captioner": (_caption, "items[0].image.uri"),
    "scorer": (_score, "images[0].uri"),
    "style-tagger": (_style, "images[0].uri"),
    "safety": (_safety, "items[0].image.uri"),
}


def _scored(stub: scorer_pb2_grpc.ScorerStub, uri: str) -> scorer_pb2.ScoreResult:
    return stub.Score(scorer_pb2.ScoreRequest(images=[_ref(uri)]), timeout=60).results[0]


# --- image references ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", list(READERS))
def test_every_image_service_refuses_files_urls_and_escaping_keys_by_default(
    default_stack: StackThread, image_host: ImageHost, service: str
) -> None:
    read, field_name = READERS[service]
    before = list(image_host.requested)
    uris = [
        "/etc/passwd",
        "file:///etc/passwd",
        "file:/etc/passwd",
        "../../../../etc/passwd",
        "images/../../../../etc/passwd",
        "./images/x.png",
        "s3://someone-elses-bucket/x.png",
        image_host.url("/img.png"),
    ]
    with channel(default_stack.settings, default_stack.settings.addr(service)) as ch:
        for uri in uris:
            error = read(ch, uri)
            assert (error.field, error.reason, error.message) == (field_name, "invalid_image", IMAGE_REFUSED), uri
        assert readiness(ch) == SERVING
    assert image_host.requested == before  # the URL was never fetched


@pytest.mark.parametrize("service", list(READERS))
def test_a_forbidden_path_that_exists_reads_exactly_like_one_that_does_not(
    default_stack: StackThread, tmp_path: Path, service: str
) -> None:
    read, _ = READERS[service]
    real = tmp_path / "real.png"
    real.write_bytes(PNG)
    pairs = [
        ("/etc/passwd", "/etc/no-such-file-here"),
        ("file:///etc/hostname", "file:///etc/no-such-hostname"),
        (str(real), str(tmp_path / "missing.png")),
        ("/etc", "/no-such-dir"),
    ]
    with channel(default_stack.settings, default_stack.settings.addr(service)) as ch:
        for exists, missing in pairs:
            assert Path(exists.removeprefix("file://")).exists() and not Path(missing.removeprefix("file://")).exists()
            a, b = read(ch, exists), read(ch, missing)
            assert (a.field, a.reason, a.message) == (b.field, b.reason, b.message), (exists, missing)


def test_blob_keys_are_read_from_the_blob_store(default_stack: StackThread) -> None:
    """What the curation tier sends: a key of the service's blob store."""
    key = image_key(image_id(PNG), "png")
    BlobStore(default_stack.settings.blob_url).put(key, PNG)
    with channel(default_stack.settings, default_stack.settings.scorer_addr) as ch:
        result = _scored(scorer_pb2_grpc.ScorerStub(ch), key)
        assert not result.HasField("error") and result.image_id == image_id(PNG), result
        missing = _score(ch, "images/00/" + "0" * 64 + ".png")
        assert missing.field == "images[0].uri" and "blob" in missing.message


def test_paths_under_an_allowed_root_are_read_and_symlinks_and_dotdots_out_of_it_are_not(
    allowing_scorer: AllowingScorer,
) -> None:
    s = allowing_scorer
    (s.root / "in.png").write_bytes(PNG)
    (s.outside / "out.png").write_bytes(png_bytes((1, 2, 3)))
    (s.root / "link-out.png").symlink_to(s.outside / "out.png")
    (s.root / "link-nowhere.png").symlink_to(s.outside / "nothing.png")
    (s.root / "dir-out").symlink_to(s.outside)
    (s.root / "link-in.png").symlink_to(s.root / "in.png")
    for ok in (s.root / "in.png", f"file://{s.root / 'in.png'}", s.root / "link-in.png"):
        result = _scored(s.stub, str(ok))
        assert not result.HasField("error") and result.image_id == image_id(PNG), (ok, result.error)
    refused = [
        s.root / "link-out.png",
        s.root / "link-nowhere.png",
        s.root / "dir-out" / "out.png",
        f"{s.root}/../outside/out.png",
        s.outside / "out.png",
        "/etc/passwd",
    ]
    for uri in refused:
        error = _scored(s.stub, str(uri)).error
        assert (error.field, error.message) == ("images[0].uri", IMAGE_REFUSED), uri
    # Inside the root the service may say what is missing: the caller may look there anyway.
    missing = _scored(s.stub, str(s.root / "missing.png")).error
    assert missing.field == "images[0].uri" and missing.message != IMAGE_REFUSED


def test_a_loopback_url_is_refused_by_default_and_read_once_its_host_is_allowed(
    default_stack: StackThread, allowing_scorer: AllowingScorer, image_host: ImageHost
) -> None:
    url = image_host.url("/img.png")
    before = image_host.requested.count("/img.png")
    with channel(default_stack.settings, default_stack.settings.scorer_addr) as ch:
        assert _score(ch, url).message == IMAGE_REFUSED
    assert image_host.requested.count("/img.png") == before
    result = _scored(allowing_scorer.stub, url)
    assert not result.HasField("error") and result.image_id == image_id(PNG), result.error
    assert image_host.requested.count("/img.png") == before + 1
    # The same host on another port is another host.
    other = f"http://127.0.0.1:{image_host.port % 65535 + 1}/img.png"
    assert _scored(allowing_scorer.stub, other).error.message == IMAGE_REFUSED


def test_an_over_cap_response_is_cut_off_with_a_named_error_and_never_read_whole(
    allowing_scorer: AllowingScorer, image_host: ImageHost
) -> None:
    image_host.big_done.clear()
    error = _scored(allowing_scorer.stub, image_host.url("/big")).error
    assert error.field == "images[0].uri" and error.reason == "invalid_image"
    assert f"larger than {CAP} bytes" in error.message and "PONY_IMAGE_MAX_BYTES" in error.message
    assert image_host.big_done.wait(60), "the image host is still sending: the reader did not hang up"
    # The reader hung up just past the cap: the host got out the cap plus what socket buffers hold, not 512 MiB.
    assert image_host.big_sent[-1] < 64 * 1024 * 1024, image_host.big_sent
    # An over-cap file under an allowed root is refused the same way.
    (allowing_scorer.root / "huge.png").write_bytes(PNG + b"\x00" * CAP)
    error = _scored(allowing_scorer.stub, str(allowing_scorer.root / "huge.png")).error
    assert f"larger than {CAP} bytes" in error.message
    assert readiness(allowing_scorer.channel) == SERVING


def test_redirects_are_followed_only_to_allowed_hosts(allowing_scorer: AllowingScorer, image_host: ImageHost) -> None:
    error = _scored(allowing_scorer.stub, image_host.url("/redirect-away")).error
    assert (error.field, error.message) == ("images[0].uri", IMAGE_REFUSED)
    assert "/redirect-target.png" not in image_host.requested  # the redirect was not followed
    result = _scored(allowing_scorer.stub, image_host.url("/redirect-here"))
    assert not result.HasField("error") and result.image_id == image_id(PNG), result.error


def test_a_host_that_stalls_is_cut_off_at_the_fetch_timeout(
    allowing_scorer: AllowingScorer, image_host: ImageHost
) -> None:
    try:
        error = _scored(allowing_scorer.stub, image_host.url("/stall")).error
    finally:
        image_host.release.set()
    assert error.field == "images[0].uri" and "PONY_IMAGE_FETCH_TIMEOUT_S" in error.message


# --- LoadVersion -----------------------------------------------------------------------------------------------


def _load_version_error(stack: SamplerStack, uri: str) -> tuple[grpc.StatusCode, str]:
    from services.sampler.client import SamplerClient

    with SamplerClient(stack.settings, timeout=300) as client, pytest.raises(grpc.RpcError) as err:
        client.load_version(uri)
    return err.value.code(), err.value.details()


@pytest.mark.triton
def test_load_version_refuses_what_is_outside_the_model_roots_without_saying_what_exists(
    sampler_stack: SamplerStack,
    tiny_models: Path,
    tmp_path: Path,
    image_host: ImageHost,
) -> None:
    outside = tmp_path / "pipeline"
    shutil.copytree(tiny_models / "auraflow", outside)  # a real pipeline, but not under a model root
    runs = Path(runs_root(sampler_stack.settings))
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "sec-link").symlink_to(outside)
    (runs / "sec-link-nowhere").symlink_to(tmp_path / "nothing")
    before = len(image_host.requested)
    refused = [
        "/tmp",
        "/etc",
        "/no/such/folder",
        str(outside),
        f"file://{outside}",
        str(runs / "sec-link"),
        str(runs / "sec-link-nowhere"),
        f"{runs}/../../../../../../etc",
        "relative/pipeline",
        image_host.url("/pipeline"),
        "s3://someone-elses-bucket/pipeline",
    ]
    answers = {uri: _load_version_error(sampler_stack, uri) for uri in refused}
    assert set(answers.values()) == {(grpc.StatusCode.INVALID_ARGUMENT, f"uri: {MODEL_REFUSED}")}, answers
    assert len(image_host.requested) == before  # no GET for the URL (it made 29 before)


@pytest.mark.triton
def test_load_version_serves_a_pipeline_under_the_runs_folder(
    sampler_stack: SamplerStack,
    tiny_models: Path,
) -> None:
    from pony.v1 import sampler_pb2
    from services.sampler.client import SamplerClient

    final = Path(runs_root(sampler_stack.settings)) / "sec-accepted" / "final"
    shutil.copytree(tiny_models / "auraflow", final)
    with SamplerClient(sampler_stack.settings, timeout=300) as client:
        loaded = client.load_version(str(final), timeout=300)
        assert loaded.active and loaded.state == sampler_pb2.VERSION_STATE_READY
        assert client.generate("a pony", seed=1, steps=1).provenance.model_version == str(loaded.version)


# --- SubmitRun -------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    settings: Settings
    channel: grpc.Channel
    stub: trainer_pb2_grpc.TrainerControllerStub

    def refusal(self, **changes: Any) -> tuple[grpc.StatusCode, str]:
        doc = {**tiny_spec(Path(export_root(self.settings)) / "manifest.parquet"), **changes}
        with pytest.raises(grpc.RpcError) as err:
            self.stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=yaml.safe_dump(doc)), timeout=30)
        return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Trainer]:
    from services.trainer.app import create_service

    settings = state_settings(
        tmp_path_factory, tiny_models, "trainer-policy", trainer_executor="local", sampler_addr=""
    )
    with serve(settings, create_service(settings)) as served, channel(settings, served.address) as ch:
        yield Trainer(settings, ch, trainer_pb2_grpc.TrainerControllerStub(ch))


def test_submit_run_refuses_paths_outside_the_roots_and_foreign_images_naming_the_field(trainer: Trainer) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert trainer.refusal(output="/etc/x") == (invalid, f"spec.output: {OUTSIDE_RUNS}")
    assert trainer.refusal(output=str(Path(trainer.settings.models_dir) / "overwritten")) == (
        invalid,
        f"spec.output: {OUTSIDE_RUNS}",
    )  # models_dir may be read from, never written into
    assert trainer.refusal(manifest="/etc/hostname") == (invalid, f"spec.manifest: {OUTSIDE_ROOTS}")
    # The same answer for a file that exists and one that does not: neither its size nor its existence leaks.
    assert trainer.refusal(manifest="/etc/hostname") == trainer.refusal(manifest="/etc/no-such-manifest")
    escaping = f"{export_root(trainer.settings)}/../../../../../../etc/hostname"
    assert trainer.refusal(manifest=escaping) == (invalid, f"spec.manifest: {OUTSIDE_ROOTS}")
    for manifest in ("export/manifest.parquet", "s3://someone-elses-bucket/m.parquet", "file:///etc/hostname"):
        assert trainer.refusal(manifest=manifest) == (invalid, f"spec.manifest: {OUTSIDE_ROOTS}"), manifest
    assert trainer.refusal(base_model="/tmp") == (invalid, f"spec.base_model: {OUTSIDE_ROOTS}")
    assert trainer.refusal(resume="/etc") == (invalid, f"spec.resume: {OUTSIDE_ROOTS}")
    for image in ("evil.example/x", "evil.example/pony-platform/cuda:0.1.0", "pony-platform-evil/cuda", "ubuntu"):
        code, details = trainer.refusal(resources={"image": image})
        assert code == invalid and details.startswith("spec.resources.image: not from an allowed registry"), image
    listed = trainer.stub.ListRuns(trainer_pb2.ListRunsRequest(), timeout=30)
    assert list(listed.runs) == []  # nothing refused became a run
    assert readiness(trainer.channel) == SERVING


def test_spec_paths_under_the_roots_and_images_from_the_registries_pass(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {}, state_dir=str(tmp_path / "state"), trainer_roots=("s3://pony-data/exports", str(tmp_path / "extra"))
    )
    runs, export = Path(runs_root(settings)), Path(export_root(settings))
    doc = tiny_spec(
        export / "m.parquet",
        base_model=str(Path(settings.models_dir) / "auraflow"),
        output=str(runs / "run-1"),
        resume=str(runs / "run-0" / "checkpoints" / "step-4"),
        resources={"image": "pony-platform/cuda:0.2.0"},
    )
    confine_spec(parse_spec(doc), settings)
    confine_spec(parse_spec({**doc, "manifest": "s3://pony-data/exports/v7/m.parquet"}), settings)
    confine_spec(parse_spec({**doc, "output": str(tmp_path / "extra" / "out")}), settings)
    confine_spec(parse_spec({**doc, "output": "/checkpoints/run-1"}), settings, ("/checkpoints",))
    ghcr = settings.replace(trainer_registries=("ghcr.io/pony",))
    confine_spec(parse_spec({**doc, "resources": {"image": "ghcr.io/pony/trainer@sha256:" + "a" * 64}}), ghcr)
    with pytest.raises(InvalidArgument, match=r"^spec\.resources\.image: "):
        confine_spec(parse_spec(doc), ghcr)  # the default image's registry is no longer on the list
    os.makedirs(runs, exist_ok=True)
    (runs / "escape").symlink_to("/etc")
    with pytest.raises(InvalidArgument, match=r"^spec\.manifest: "):
        confine_spec(parse_spec({**doc, "manifest": str(runs / "escape" / "hostname")}), settings)


def test_the_shipped_production_spec_passes_the_shipped_cluster_config() -> None:
    """deploy/base/config.env names the roots services/trainer/specs/v7-production.yaml reads from."""
    from services.trainer.render import CHECKPOINT_MOUNT
    from services.trainer.spec import load_spec

    root = Path(__file__).resolve().parents[2]
    lines = (root / "deploy" / "base" / "config.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    settings = Settings.from_env(env)
    spec = load_spec(root / "services" / "trainer" / "specs" / "v7-production.yaml")
    confine_spec(spec, settings, (CHECKPOINT_MOUNT,))
    with pytest.raises(InvalidArgument, match=r"^spec\.manifest: "):
        confine_spec(spec.replace(manifest="s3://pony-datasets/other/m.parquet"), settings, (CHECKPOINT_MOUNT,))
