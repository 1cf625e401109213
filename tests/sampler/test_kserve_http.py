"""The sampler's KServe v2 HTTP endpoint (services/sampler/kserve_http.py) against the real stack: a plain JSON
`infer` (urllib, and Triton's own `tritonclient.http`) draws the same pixels and PNG parameters as gRPC Generate,
through the same token roles, validation and prompt safety check; health, metadata and the protocol's errors."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pony_common import errors
from services.sampler.client import SamplerClient
from services.sampler.kserve_http import MAX_BODY_BYTES, _status_of
from tests.conftest import free_port
from tests.sampler_stack import SamplerStack

pytestmark = pytest.mark.triton

GENERATE_TOKEN = "kserve-generate-token"


@dataclass
class Endpoint:
    url: str  # http://127.0.0.1:<port>
    grpc_target: str
    stack: SamplerStack

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = GENERATE_TOKEN, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, parsed JSON body) of one request; errors are answers too."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())


@pytest.fixture(scope="module")
def endpoint(sampler_stack: SamplerStack) -> Iterator[Endpoint]:
    """One more sampler over the stack's Triton and safety service, with its HTTP endpoint on a free port and a
    `generate` token beside the stack's admin token; stopped whatever happens."""
    port = free_port()
    settings = sampler_stack.settings.replace(
        triton_start=False,
        triton_url=sampler_stack.model.url,
        sampler_http_port=port,
        bind_host="127.0.0.1",
        auth_tokens=f"generate:{GENERATE_TOKEN}",
    )
    running = sampler_stack.start_sampler(settings)
    try:
        yield Endpoint(f"http://127.0.0.1:{port}", f"127.0.0.1:{running.port}", sampler_stack)
    finally:
        sampler_stack.stop_server(running)


def tensor(name: str, datatype: str, value: Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [1], "data": [value]}


def infer_body(prompt: str, seed: int, **params: Any) -> dict[str, Any]:
    return {
        "inputs": [
            tensor("PROMPT", "BYTES", prompt),
            tensor("SEED", "INT64", seed),
            tensor("STEPS", "INT32", 2),
            tensor("NUM_IMAGES", "INT32", 1),
        ],
        "parameters": params,
    }


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def png_text(png: bytes) -> dict[str, str]:
    return dict(Image.open(io.BytesIO(png)).text)


def test_a_json_infer_draws_what_grpc_generate_draws(endpoint: Endpoint) -> None:
    status, headers, body = endpoint.call(
        "POST", "/v2/models/pony_v7/infer", infer_body("a pony in a meadow", 7, score=9)
    )
    assert status == 200, body
    assert headers.get("x-request-id")
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"IMAGES", "SEEDS", "BLOCKED_SEEDS", "BLOCKED_REASONS"}
    images = outputs["IMAGES"]
    assert images["datatype"] == "BYTES" and images["shape"] == [1]
    assert images["parameters"] == {"content_type": "base64"}
    png = base64.b64decode(images["data"][0])
    assert outputs["SEEDS"]["data"] == [7] and outputs["BLOCKED_SEEDS"]["data"] == []
    assert body["model_name"] == "pony_v7" and body["parameters"]["safety"] == "checked"
    assert body["parameters"]["prompt"].startswith("score_9")  # the family's tags, assembled as for gRPC

    with SamplerClient(endpoint.stack.settings, target=endpoint.grpc_target, timeout=120) as client:
        resp = client.generate("a pony in a meadow", seed=7, steps=2, num_images=1, score=9)
    assert resp.prompt == body["parameters"]["prompt"]
    assert np.array_equal(pixels(png), pixels(resp.images[0].png))
    assert png_text(png) == png_text(resp.images[0].png)  # the same PNG parameters (A1111 text and JSON)
    assert "parameters" in png_text(png)


def test_triton_s_own_http_client_generates_with_binary_outputs(endpoint: Endpoint) -> None:
    """A stock KServe v2 client: tritonclient.http asks for binary outputs (the binary tensor data extension)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(endpoint.url.removeprefix("http://"))
    try:
        prompt = httpclient.InferInput("PROMPT", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"a pony in a meadow"], dtype=object), binary_data=False)
        seed = httpclient.InferInput("SEED", [1], "INT64")
        seed.set_data_from_numpy(np.array([7], dtype=np.int64), binary_data=False)
        steps = httpclient.InferInput("STEPS", [1], "INT32")
        steps.set_data_from_numpy(np.array([2], dtype=np.int32), binary_data=False)
        result = client.infer(
            "pony_v7",
            [prompt, seed, steps],
            outputs=[httpclient.InferRequestedOutput("IMAGES"), httpclient.InferRequestedOutput("SEEDS")],
            headers={"Authorization": f"Bearer {GENERATE_TOKEN}"},
            parameters={"score": 9},
        )
        images, seeds = result.as_numpy("IMAGES"), result.as_numpy("SEEDS")
    finally:
        client.close()
    assert list(seeds) == [7]
    _, _, body = endpoint.call("POST", "/v2/models/pony_v7/infer", infer_body("a pony in a meadow", 7, score=9))
    assert np.array_equal(pixels(bytes(images[0])), pixels(base64.b64decode(body["outputs"][0]["data"][0])))


def test_a_blocked_prompt_is_refused_as_over_grpc(endpoint: Endpoint) -> None:
    body = infer_body("a pony, loli, standing in a field", 3)
    body["inputs"][3] = tensor("NUM_IMAGES", "INT32", 2)
    status, _, answer = endpoint.call("POST", "/v2/models/pony_v7/infer", body)
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["IMAGES"]["shape"] == [0] and outputs["IMAGES"]["data"] == []
    assert outputs["BLOCKED_SEEDS"]["data"] == [3, 4]
    for reasons in outputs["BLOCKED_REASONS"]["data"]:
        (reason,) = json.loads(reasons)
        assert reason["rule_id"] == "tags.blocked"
        assert reason["message"].startswith("prompt refused before generation: blocked tag 'loli'")


def test_tokens_and_roles_are_the_grpc_ones(endpoint: Endpoint) -> None:
    body = infer_body("a pony", 1)
    for token, why in ((None, "missing bearer token"), ("not-a-token", "invalid bearer token")):
        status, headers, answer = endpoint.call("POST", "/v2/models/pony_v7/infer", body, token=token)
        assert (status, answer) == (401, {"error": why})
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert endpoint.call("GET", "/v2/models/pony_v7", token=token)[0] == 401
        assert endpoint.call("GET", "/v2", token=token)[0] == 401


def test_health_is_open_and_metadata_describes_the_families(endpoint: Endpoint) -> None:
    for path, expected in (
        ("/v2/health/live", {"live": True}),
        ("/v2/health/ready", {"ready": True}),
        ("/v2/models/pony_v6/ready", {"name": "pony_v6", "ready": True}),
    ):
        assert endpoint.call("GET", path, token=None)[::2] == (200, expected), path
    status, _, server = endpoint.call("GET", "/v2")
    assert status == 200 and server["extensions"] == ["binary_tensor_data"]
    status, _, meta = endpoint.call("GET", "/v2/models/pony_v6")
    assert status == 200 and meta["name"] == "pony_v6" and meta["versions"]
    inputs = {t["name"]: (t["datatype"], t["optional"]) for t in meta["inputs"]}
    assert inputs["PROMPT"] == ("BYTES", False) and inputs["SEED"] == ("INT64", True)
    assert inputs["GUIDANCE"] == ("FP32", True) and inputs["NUM_IMAGES"] == ("INT32", True)
    assert [t["name"] for t in meta["outputs"]] == ["IMAGES", "SEEDS", "BLOCKED_SEEDS", "BLOCKED_REASONS"]


def test_unknown_models_and_paths_are_404(endpoint: Endpoint) -> None:
    status, _, answer = endpoint.call("POST", "/v2/models/pony_v9/infer", infer_body("a pony", 1))
    assert status == 404 and "pony_v9" in answer["error"] and "pony_v7" in answer["error"]
    assert endpoint.call("GET", "/v2/models/pony_v7_sync")[0] == 404
    assert endpoint.call("GET", "/v2/nothing/here")[0] == 404


def _with(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    body = infer_body("a pony", 1)
    body["inputs"] = [e for e in body["inputs"] if e["name"] != name] + [entry]
    return body


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "request"),
        (b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "request"),
        (
            _with("PROMPT", {"name": "PROMPT", "datatype": "BYTES", "shape": [1], "data": [[[["a pony"], "x"]]]}),
            "PROMPT",
        ),
        ([1, 2], "request"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [tensor("SEED", "INT64", 1)]}, "PROMPT"),
        (_with("WIDTH", tensor("WIDTH", "FP32", 64.0)), "WIDTH"),
        (_with("WIDTH", tensor("WIDTH", "INT32", 64, shape=[2])), "WIDTH"),
        (_with("HEIGHT", {"name": "HEIGHT", "datatype": "INT32", "shape": [1], "data": [64, 64]}), "HEIGHT"),
        (_with("STEPS", tensor("STEPS", "INT32", 2**40)), "STEPS"),
        (_with("NUM_IMAGES", tensor("NUM_IMAGES", "INT32", 1_000_000)), "NUM_IMAGES"),
        (_with("PROMPT", tensor("PROMPT", "BYTES", 12)), "PROMPT"),
        (_with("GUIDANCE", tensor("GUIDANCE", "FP32", "lots")), "GUIDANCE"),
        (_with("SEED", tensor("SEED", "INT64", -1)), "SEED"),
        (_with("WIDTH", tensor("WIDTH", "INT32", 65)), "WIDTH"),
        (_with("SIZE", tensor("SIZE", "INT32", 64)), "SIZE"),
        ({**infer_body("a pony", 1), "parameters": {"score": "nine"}}, "parameters.score"),
        ({**infer_body("a pony", 1), "parameters": {"source": "somewhere"}}, "parameters.source"),
        ({**infer_body("a pony", 1), "parameters": {"adapters": "no-such-lora"}}, "parameters.adapters[0].name"),
        ({**infer_body("a pony", 1), "parameters": {"colour": "red"}}, "parameters.colour"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_400_naming_the_input(endpoint: Endpoint, body: Any, named: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = endpoint.call("POST", "/v2/models/pony_v7/infer", raw=raw)
    assert status == 400, answer
    assert answer["error"].startswith(f"{named}:") or f"{named!r}" in answer["error"], answer


def test_a_body_over_the_limit_is_refused(endpoint: Endpoint) -> None:
    huge = json.dumps(_with("PROMPT", tensor("PROMPT", "BYTES", "a" * (MAX_BODY_BYTES + 10)))).encode()
    try:
        status, _, answer = endpoint.call("POST", "/v2/models/pony_v7/infer", raw=huge)
    except (ConnectionError, urllib.error.URLError):
        # The server closed the connection while the client was still sending: refused before the body was read
        # (no status reaches the client then); the server keeps serving.
        status, _, answer = endpoint.call("GET", "/v2/health/live", token=None)
        assert status == 200 and answer == {"live": True}
        return
    assert status == 413 and "limit" in answer["error"]


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidArgument("num_images", "must be in 1..4"), 400),
        (errors.Overloaded("pony_v7 is overloaded; retry-after: 2s"), 429),
        (errors.DependencyUnavailable("Triton is unavailable"), 503),
        (errors.FailedPrecondition("model_version: not serving"), 400),
        (RuntimeError("secret internals"), 500),
    ],
)
def test_service_errors_map_to_the_protocol_s_statuses(exc: Exception, status: int) -> None:
    got, message, headers = _status_of(exc)
    assert got == status
    if status == 400 and isinstance(exc, errors.InvalidArgument):
        assert message.startswith("NUM_IMAGES: ")
    if status == 429:
        assert headers == {"Retry-After": "2"}
    if status == 500:
        assert "secret" not in message


def test_the_http_port_starts_and_stops_with_the_sampler(sampler_stack: SamplerStack) -> None:
    """It is bound when the sampler starts and closed when it stops; a port taken fails the start."""
    import socket

    base = sampler_stack.settings.replace(triton_start=False, triton_url=sampler_stack.model.url, bind_host="127.0.0.1")
    port = free_port()
    running = sampler_stack.start_sampler(base.replace(sampler_http_port=port), model=None)
    try:
        live = Endpoint(f"http://127.0.0.1:{port}", "", sampler_stack).call("GET", "/v2/health/live", token=None)
        assert live[::2] == (200, {"live": True})
    finally:
        sampler_stack.stop_server(running)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            sampler_stack.start_sampler(base.replace(sampler_http_port=taken.getsockname()[1]))


def test_a_client_that_goes_away_cancels_its_triton_request(endpoint: Endpoint) -> None:
    """As a cancelled gRPC call: the model stops at its next step (Triton's log names the request id)."""
    import socket

    from tests.sampler.test_triton_sampler import wait_for_log

    body = infer_body("a late owl", 1)
    body["inputs"] += [tensor("WIDTH", "INT32", 512), tensor("HEIGHT", "INT32", 512)]
    body["inputs"][2] = tensor("STEPS", "INT32", 100)
    req = urllib.request.Request(f"{endpoint.url}/v2/models/pony_v7/infer", data=json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {GENERATE_TOKEN}")
    req.add_header("x-request-id", "http-gone-1")
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(req, timeout=1.5)
    found = wait_for_log(endpoint.stack, r"pony_v7 request http-gone-1 cancelled after step (\d+) of 100")
    assert int(found.group(1)) < 100
