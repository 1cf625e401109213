"""The sampler over KServe v2 / Open Inference Protocol HTTP, transport only: plain HTTP clients generate through
the same `SamplerService` path as `pony.v1.Sampler/Generate` (validation, prompt safety, Triton, PNG parameters,
image safety), with the same bearer tokens and roles.

Endpoints (`{model}` is a served family, e.g. `pony_v7`, `pony_v6`):

    GET  /v2/health/live, /v2/health/ready, /v2/models/{model}/ready     open (probes send no token)
    GET  /v2                                   server metadata          role `generate`
    GET  /v2/models/{model}[/versions/{v}]     model metadata           role `generate`
    POST /v2/models/{model}[/versions/{v}]/infer                        role `generate`; `v` pins `model_version`

Infer inputs (each one element, shape `[1]` or `[1, 1]`): `PROMPT` BYTES (a JSON string), optional `NEGATIVE_PROMPT`
BYTES, `WIDTH`/`HEIGHT`/`STEPS`/`NUM_IMAGES` INT32, `GUIDANCE` FP32, `SEED` INT64. Request `parameters` (protocol
parameters are strings, numbers or booleans): `score` (int), `source`, `rating`, `style_clusters` ("3,17"),
`palette` ("red,sky_blue"), `style_family`, `raw_prompt` (bool), `adapters` ("name[:version][=weight],...").

Outputs: `IMAGES` BYTES [n] (PNGs; in JSON each element is base64 text and the output's parameters say
`content_type: base64`, since the protocol's JSON strings carry text only; with the binary tensor data extension
(`binary_data: true` on the requested output, or `binary_data_output: true` on the request) the PNG bytes follow the
JSON body instead), `SEEDS` INT64 [n], `BLOCKED_SEEDS` INT64 [m], `BLOCKED_REASONS` BYTES [m] (each a JSON list of
`{rule_id, message}`). Response `parameters`: the assembled prompt, seed, size, steps, guidance, safety status.

Errors are `{"error": "..."}`: 400 bad input (naming the input or parameter), 401 no or unknown token, 403 a role
too low, 404 unknown model or path, 413 a body over the limit, 429 overloaded (with `Retry-After`), 503 a dependency
(Triton, safety) unavailable or still loading, 504 past the deadline, 500 otherwise (details in the server log).

The server runs its own event loop in a thread (`KServeHTTPServer`): it starts and stops synchronously with the gRPC
server, and a slow HTTP client never holds the gRPC loop. The service's asyncio clients (Triton, safety) keep one
channel per event loop, so both loops share the model, the encoder pool and the safety gate."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pony_common import errors
from pony_common.config import Settings
from pony_common.fields import NAME_MAX, check_text
from pony_common.grpc.auth import Authorizer, Role, Tokens, require_credentials
from pony_common.logs import new_request_id, request_id_var
from services.sampler.client import lora_ref
from services.sampler.generation import AdapterRequest, GenerationInput, GenerationResult
from services.sampler.model import RETRY_AFTER_S
from services.sampler.prompts import PromptTags
from services.sampler.service import SamplerService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # an infer body: two texts of PONY_SAMPLER_MAX_PROMPT_CHARS fit many times over
SERVER_NAME = "pony-sampler"
PROTOCOL_VERSION = "2"
EXTENSIONS = ["binary_tensor_data"]
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
# The binary tensor data extension: the JSON part's length when binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_END = object()


@dataclass(frozen=True)
class Tensor:
    """An input or output of the model metadata: name, KServe datatype, shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    field: str = ""  # the GenerationInput field it fills (inputs only)
    optional: bool = True

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.field:
            out["optional"] = self.optional
        return out


INPUTS = (
    Tensor("PROMPT", "BYTES", (1,), "prompt", optional=False),
    Tensor("NEGATIVE_PROMPT", "BYTES", (1,), "negative_prompt"),
    Tensor("WIDTH", "INT32", (1,), "width"),
    Tensor("HEIGHT", "INT32", (1,), "height"),
    Tensor("STEPS", "INT32", (1,), "steps"),
    Tensor("GUIDANCE", "FP32", (1,), "guidance"),
    Tensor("SEED", "INT64", (1,), "seed"),
    Tensor("NUM_IMAGES", "INT32", (1,), "num_images"),
)
OUTPUTS = (
    Tensor("IMAGES", "BYTES", (-1,)),
    Tensor("SEEDS", "INT64", (-1,)),
    Tensor("BLOCKED_SEEDS", "INT64", (-1,)),
    Tensor("BLOCKED_REASONS", "BYTES", (-1,)),
)
INPUT_OF = {t.name: t for t in INPUTS}
OUTPUT_NAMES = tuple(t.name for t in OUTPUTS)
PARAMETERS = ("score", "source", "rating", "style_clusters", "palette", "style_family", "raw_prompt", "adapters")
# A validator error names a GenerationInput field; the HTTP caller named an input or a parameter.
FIELD_NAMES = {t.field: t.name for t in INPUTS} | {"tags.score": "parameters.score", "tags.source": "parameters.source"}
FIELD_NAMES |= {"tags.rating": "parameters.rating", "tags.style_family": "parameters.style_family"}


class BadRequest(Exception):
    """A 4xx answer before any service work: its status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _field_name(field: str) -> str:
    """`num_images` -> `NUM_IMAGES`, `tags.palette[2]` -> `parameters.palette[2]`, `adapters[0].name` as it is
    prefixed with `parameters.`."""
    if field in FIELD_NAMES:
        return FIELD_NAMES[field]
    if field.startswith("tags."):
        return "parameters." + field[5:]
    if field.startswith("adapters"):
        return "parameters." + field
    return field


def _elements(data: Any) -> list[Any]:
    """The elements of a tensor's `data`, row major (the protocol allows nested or flat arrays); no recursion, so
    any nesting JSON parsed is flattened."""
    out: list[Any] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _scalar(entry: Any, tensor: Tensor) -> Any:
    """The one element of an input, checked against its datatype and shape; BadRequest(400) naming the input."""
    name = tensor.name
    datatype = entry.get("datatype")
    if datatype != tensor.datatype:
        raise BadRequest(400, f"{name}: datatype must be {tensor.datatype}, got {str(datatype)[:32]!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(400, f"{name}: shape must be a list of non-negative integers")
    count = math.prod(shape) if shape else 1
    if count != 1:
        raise BadRequest(400, f"{name}: takes one element (shape [1]); shape {shape[:8]} holds {count}")
    if "data" not in entry:
        raise BadRequest(400, f"{name}: has no data (binary inputs are not accepted; send JSON data)")
    values = _elements(entry["data"])
    if len(values) != 1:
        raise BadRequest(400, f"{name}: shape {shape} holds 1 element; data has {len(values)}")
    value = values[0]
    if tensor.datatype == "BYTES":
        if not isinstance(value, str):
            raise BadRequest(400, f"{name}: a BYTES element is a JSON string here, got {type(value).__name__}")
        return value
    if tensor.datatype in ("INT32", "INT64"):
        low, high = INT32 if tensor.datatype == "INT32" else INT64
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(400, f"{name}: an {tensor.datatype} element is an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise BadRequest(400, f"{name}: {value} is out of the {tensor.datatype} range")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(400, f"{name}: an FP32 element is a finite number, got {str(value)[:32]!r}")
    return float(value)


def _param(params: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = params.get(name, default)
    if value is default:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(400, f"parameters.{name}: must be an integer, got {str(value)[:32]!r}")
    if kind is bool and not isinstance(value, bool):
        raise BadRequest(400, f"parameters.{name}: must be true or false, got {str(value)[:32]!r}")
    if kind is str and not isinstance(value, str):
        raise BadRequest(400, f"parameters.{name}: must be a string, got {type(value).__name__}")
    return value


def _list(params: dict[str, Any], name: str) -> list[str]:
    text = _param(params, name, str, "")
    check_text(text, f"parameters.{name}", 64 * NAME_MAX, multiline=False)
    return [part.strip() for part in text.split(",") if part.strip()]


def generation_input(body: Any, family: str, version: int) -> GenerationInput:
    """The GenerationInput of an infer request body (a parsed JSON object); BadRequest(400) naming the input or
    parameter at fault. Validation proper (limits, tokens, tags) is the service's, as for gRPC."""
    if not isinstance(body, dict):
        raise BadRequest(400, "request: the body must be a JSON object with `inputs`")
    entries = body.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise BadRequest(400, "inputs: must be a non-empty list of tensors (PROMPT at least)")
    values: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(400, f"inputs[{i}]: must be an object with a name, datatype, shape and data")
        tensor = INPUT_OF.get(entry["name"])
        if tensor is None:
            known = ", ".join(INPUT_OF)
            raise BadRequest(400, f"inputs[{i}]: unknown input {entry['name'][:64]!r}; the inputs are {known}")
        if tensor.name in values:
            raise BadRequest(400, f"{tensor.name}: given twice")
        values[tensor.name] = _scalar(entry, tensor)
    if "PROMPT" not in values:
        raise BadRequest(400, "PROMPT: is required")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest(400, "parameters: must be a JSON object")
    unknown = sorted(set(params) - set(PARAMETERS) - {"binary_data_output"})
    if unknown:
        raise BadRequest(400, f"parameters.{unknown[0][:64]}: unknown; the parameters are {', '.join(PARAMETERS)}")
    try:
        clusters = tuple(int(c) for c in _list(params, "style_clusters"))
    except ValueError:
        raise BadRequest(400, 'parameters.style_clusters: comma-separated integers, e.g. "3,17"') from None
    adapters = []
    for i, text in enumerate(_list(params, "adapters")):
        try:
            ref = lora_ref(text)
        except ValueError as exc:
            raise BadRequest(400, f"parameters.adapters[{i}]: {exc}") from None
        adapters.append(AdapterRequest(ref.name, ref.version, ref.weight if ref.HasField("weight") else None))
    for key in ("source", "rating", "style_family"):
        check_text(_param(params, key, str, ""), f"parameters.{key}", NAME_MAX, multiline=False)
    tags = PromptTags(
        score=_param(params, "score", int, None),
        style_clusters=clusters,
        source=_param(params, "source", str, "").strip().lower(),
        rating=_param(params, "rating", str, "").strip().lower(),
        palette=tuple(c.lower() for c in _list(params, "palette")),
        style_family=_param(params, "style_family", str, "").strip(),
    )
    check_text(values["PROMPT"], "PROMPT")
    check_text(values.get("NEGATIVE_PROMPT", ""), "NEGATIVE_PROMPT")
    return GenerationInput(
        prompt=values["PROMPT"],
        negative_prompt=values.get("NEGATIVE_PROMPT", ""),
        width=values.get("WIDTH", 0),
        height=values.get("HEIGHT", 0),
        steps=values.get("STEPS", 0),
        guidance=values.get("GUIDANCE"),
        seed=values.get("SEED"),
        num_images=values.get("NUM_IMAGES", 0),
        tags=tags,
        raw_prompt=_param(params, "raw_prompt", bool, False),
        model=family,
        model_version=version,
        adapters=tuple(adapters),
    )


def requested_outputs(body: dict[str, Any]) -> dict[str, bool]:
    """Output name -> as binary data, for the outputs the request asks for (all of them when it names none)."""
    params = body.get("parameters") or {}
    binary = params.get("binary_data_output") is True
    asked = body.get("outputs")
    if asked is None:
        return dict.fromkeys(OUTPUT_NAMES, binary)
    if not isinstance(asked, list):
        raise BadRequest(400, "outputs: must be a list of {name, parameters}")
    out: dict[str, bool] = {}
    for i, item in enumerate(asked):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUT_NAMES:
            raise BadRequest(400, f"outputs[{i}]: unknown output {str(name)[:64]!r}; the outputs are {OUTPUT_NAMES}")
        item_params = item.get("parameters") or {}
        out[name] = item_params.get("binary_data", binary) is True if isinstance(item_params, dict) else binary
    return out


def _bytes_binary(elements: list[bytes]) -> bytes:
    """BYTES elements in the binary tensor data extension: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def response_body(result: GenerationResult, outputs: dict[str, bool], request_id: str) -> tuple[bytes, int | None]:
    """The infer response: (body, JSON header length when binary tensors follow it, else None)."""
    spec = result.spec
    reasons = [json.dumps([{"rule_id": r, "message": m} for r, m in b.reasons]) for b in result.blocked]
    tensors: dict[str, tuple[str, list[Any]]] = {
        "IMAGES": ("BYTES", [image.png for image in result.images]),
        "SEEDS": ("INT64", [image.seed for image in result.images]),
        "BLOCKED_SEEDS": ("INT64", [b.seed for b in result.blocked]),
        "BLOCKED_REASONS": ("BYTES", [r.encode() for r in reasons]),
    }
    binary_parts: list[bytes] = []
    out = []
    for name, binary in outputs.items():
        datatype, data = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(data)]}
        if binary:
            raw = _bytes_binary(data) if datatype == "BYTES" else struct.pack(f"<{len(data)}q", *data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary_parts.append(raw)
        elif name == "IMAGES":
            entry["parameters"] = {"content_type": "base64"}
            entry["data"] = [base64.b64encode(png).decode("ascii") for png in data]
        elif datatype == "BYTES":
            entry["data"] = [d.decode() for d in data]
        else:
            entry["data"] = data
        out.append(entry)
    header = {
        "model_name": spec.model,
        "model_version": result.model_version,
        "id": request_id,
        "parameters": {
            "prompt": spec.prompt,
            "negative_prompt": spec.negative_prompt,
            "seed": spec.seed,
            "width": spec.width,
            "height": spec.height,
            "steps": spec.steps,
            "guidance": spec.guidance,
            "model_hash": result.model_hash,
            "safety": "checked" if result.safety_checked else "not_checked",
            "safety_note": result.safety_note,
            "batch_size": result.batch_size,
            "adapters": ",".join(f"{a.name}:{a.version}={a.weight:g}" for a in spec.adapters),
        },
        "outputs": out,
    }
    text = json.dumps(header).encode()
    if not binary_parts:
        return text, None
    return text + b"".join(binary_parts), len(text)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _status_of(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    """The HTTP status, caller-safe message and headers of an error from the service (as the gRPC interceptor
    maps it to a status code)."""
    if isinstance(exc, errors.InvalidArgument):
        return 400, f"{_field_name(exc.field)}: {exc.message}", {}
    if isinstance(exc, errors.FailedPrecondition):
        return 400, str(exc), {}
    if isinstance(exc, errors.NotFound):
        return 404, str(exc), {}
    if isinstance(exc, errors.Overloaded):
        return 429, str(exc), {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(exc, errors.DependencyUnavailable):
        return 503, str(exc), {}
    if isinstance(exc, errors.Cancelled):
        return 504, str(exc), {}
    return 500, "internal error (see server logs with the request id)", {}


class KServeHTTP:
    """The aiohttp application over a SamplerService; `tokens` as the gRPC server has them (none: every call
    passes, loopback only)."""

    # The role each route needs (as a servicer's ROLES); health routes are open.
    ROLES = {"infer": Role.GENERATE, "metadata": Role.GENERATE}

    def __init__(self, settings: Settings, service: SamplerService, tokens: Tokens) -> None:
        self.settings = settings
        self.service = service
        self.auth = Authorizer(tokens, dict(self.ROLES))
        self.in_flight = 0
        self.max_in_flight = settings.max_concurrent_rpcs or 0

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/{model}", self.model_metadata)
        app.router.add_get("/v2/models/{model}/versions/{version}", self.model_metadata)
        app.router.add_get("/v2/models/{model}/ready", self.model_ready)
        app.router.add_get("/v2/models/{model}/versions/{version}/ready", self.model_ready)
        app.router.add_post("/v2/models/{model}/infer", self.infer)
        app.router.add_post("/v2/models/{model}/versions/{version}/infer", self.infer)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Request id (the caller's `x-request-id` when plain, else a new one) on the logs and the response; every
        error as `{"error": ...}`."""
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else new_request_id()
        request_id_var.set(rid)
        try:
            response = await handler(request)
        except BadRequest as exc:
            response = _error(exc.status, exc.message, exc.headers)
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, f"request: the body is over the limit of {MAX_BODY_BYTES} bytes")
        except web.HTTPException as exc:  # aiohttp's own: unknown path (404), wrong method (405)
            response = _error(exc.status, exc.reason or "error", {k: v for k, v in exc.headers.items() if k == "Allow"})
        except errors.PonyError as exc:
            status, message, headers = _status_of(exc)
            log.info("kserve request failed", extra={"status": status, "error": message})
            response = _error(status, message, headers)
        except Exception:
            log.exception("kserve request failed")
            response = _error(500, "internal error (see server logs with the request id)")
        response.headers["x-request-id"] = rid
        return response

    def _authorize(self, request: web.Request, route: str) -> None:
        given = request.headers.getall("Authorization", [])
        # Repeated headers are one ambiguous credential, which no token matches (as over gRPC).
        denied = self.auth.check(route, {"authorization": ", ".join(given)} if given else {})
        if denied is not None:
            code, message = denied
            status = 403 if code.name == "PERMISSION_DENIED" else 401
            headers = {"WWW-Authenticate": 'Bearer realm="pony-sampler"'} if status == 401 else {}
            raise BadRequest(status, message, headers)

    def _family(self, request: web.Request) -> tuple[str, int]:
        """The family the path names and the version it pins (0 = the serving one); 404 for an unknown one."""
        name = request.match_info["model"]
        families = self.service.model.families
        if name not in families:
            raise BadRequest(404, f"unknown model {name[:64]!r}; served: {', '.join(families)}")
        version_text = request.match_info.get("version", "")
        if not version_text:
            return name, 0
        if not version_text.isdigit() or int(version_text) > 2**32 - 1:
            raise BadRequest(400, f"version: must be a version number, got {version_text[:32]!r}")
        return name, int(version_text)

    # --- health (open) ---

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.service.model.ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, _ = self._family(request)
        ready = self.service.model.ready
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    # --- metadata ---

    async def server_metadata(self, request: web.Request) -> web.Response:
        self._authorize(request, "metadata")
        return web.json_response({"name": SERVER_NAME, "version": PROTOCOL_VERSION, "extensions": EXTENSIONS})

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._authorize(request, "metadata")
        name, _ = self._family(request)
        family = self.service.model.families[name]
        repository = self.service.model.repositories.get(name)
        versions = [str(v.version) for v in repository.versions()] if repository is not None else []
        return web.json_response(
            {
                "name": name,
                "versions": versions,
                "platform": f"pony-sampler/{family.pipeline}",
                "inputs": [t.metadata() for t in INPUTS],
                "outputs": [t.metadata() for t in OUTPUTS],
                "parameters": {"default": family.is_default, "prompt_convention": family.convention.name},
            }
        )

    # --- inference ---

    async def infer(self, request: web.Request) -> web.Response:
        self._authorize(request, "infer")  # before the body is read: a refused caller's bytes are never parsed
        family, version = self._family(request)
        if request.headers.get(HEADER_LENGTH):
            raise BadRequest(400, "request: binary input tensors are not accepted; send the inputs as JSON data")
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; nesting past the parser's depth
            raise BadRequest(400, "request: the body is not JSON (an inference request object)") from None
        given = generation_input(body, family, version)
        outputs = requested_outputs(body)
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            raise errors.Overloaded(f"the sampler is serving {self.in_flight} calls; retry-after: {RETRY_AFTER_S}s")
        self.in_flight += 1
        try:
            spec = await asyncio.to_thread(self.service.spec, given)
            result = await self.service.generate(spec, timeout=self.settings.sampler.job_timeout_s)
        finally:
            self.in_flight -= 1
        rid = body.get("id") if isinstance(body.get("id"), str) else request_id_var.get()
        data, header_length = await asyncio.to_thread(response_body, result, outputs, str(rid)[:128])
        if header_length is None:
            return web.Response(body=data, content_type="application/json")
        return web.Response(
            body=data, content_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)}
        )


class KServeHTTPServer:
    """`KServeHTTP` on `host:port` (0 = a free port) in a thread of its own with its own event loop; `start()`
    returns once the port is bound (or raises why it could not be), `stop()` drains and closes it."""

    def __init__(self, settings: Settings, service: SamplerService) -> None:
        self.settings = settings
        self.service = service
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and serves; the bound port. Off loopback without tokens it refuses (ConfigError), as gRPC does."""
        if self._thread is not None:
            return self.port
        address = f"{host}:{port}"
        tokens = require_credentials(self.settings, "sampler (KServe HTTP)", address)
        app = KServeHTTP(self.settings, self.service, tokens).application()
        ssl_context = None
        if self.settings.tls_cert and self.settings.tls_key:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
        loop = asyncio.new_event_loop()
        started: asyncio.Future[int] = loop.create_future()

        async def serve() -> None:
            # A client that goes away cancels its handler, and so its Triton stream (as a gRPC cancel does).
            runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=self.settings.shutdown_grace_s
            )
            try:
                await runner.setup()
                site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
                await site.start()
            except Exception as exc:  # the bind failed: start() raises it
                await runner.cleanup()
                started.set_exception(exc)
                return
            self._runner = runner
            started.set_result(runner.addresses[0][1] if runner.addresses else port)

        def run() -> None:
            asyncio.set_event_loop(loop)
            serving = loop.create_task(serve())
            loop.run_forever()
            del serving
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="kserve-http", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(started), 30), loop).result(35)
        except BaseException:
            self.stop()
            raise
        log.info("serving KServe v2 HTTP", extra={"port": self.port, "tls": ssl_context is not None})
        return self.port

    def stop(self) -> None:
        """Stops accepting, lets requests in flight finish (PONY_SHUTDOWN_GRACE_S), closes this loop's clients."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            for close in (self.service.model.aclose, self.service.gate.aclose):
                try:
                    await close()
                except Exception:
                    log.debug("closing a client of the HTTP loop", exc_info=True)

        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(shutdown(), loop).result(self.settings.shutdown_grace_s + 30)
        except Exception:
            log.warning("KServe HTTP server did not stop cleanly", exc_info=True)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._loop = self._thread = self._runner = None
