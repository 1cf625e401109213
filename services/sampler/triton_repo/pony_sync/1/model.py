"""Triton Python-backend model `<family>_sync`: the non-decoupled sibling of a family's (decoupled) model, for
plain KServe-v2 clients (`POST /v2/models/pony_v7_sync/infer` with a JSON body, or any `infer` call).

It loads no pipeline: each request is forwarded whole (every input it carries, its request id) to the family model
named by the config's `target_model` parameter through BLS (`InferenceRequest.exec(decoupled=True)`); the progress
responses are dropped and the final response's outputs (IMAGES, SEEDS, ...) are this request's response. An error
of the family model (bad input, a full queue, a failed batch) is this request's error, with its code (HTTP 400,
503, 500). The requests of one batch of this model are forwarded at once, so the family's batcher can merge them.

Priorities: Triton 2.51's BLS requests carry no priority, so a client's KServe `priority` parameter orders this
model's own queue (the same levels as the family's); the forwarded request takes the family's default level.
This file is copied into the sibling's version folder (`<repo>/<family>_sync/1/model.py`)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import triton_python_backend_utils as pb_utils


def _error(error: Any) -> Any:
    """The family model's error as this request's, with its code; our `invalid_argument: field: why` errors are
    INVALID_ARG (HTTP 400), whatever code they were sent with."""
    code = error.code()
    if error.message().lower().startswith("invalid_argument:"):
        code = pb_utils.TritonError.INVALID_ARG
    return pb_utils.TritonError(error.message(), code)


class TritonPythonModel:
    """Forwards each request to the family model and answers with its final response."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        if pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(f"{config['name']} must not be decoupled")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        self.target = params.get("target_model", "")
        if not self.target:
            raise pb_utils.TritonModelException(f"{self.name}: the `target_model` parameter names no model")
        self.outputs = [output["name"] for output in config.get("output", [])]
        self.pool = ThreadPoolExecutor(max(1, int(config.get("max_batch_size", 1))), thread_name_prefix="forward")
        pb_utils.Logger.log_info(f"{self.name} forwards to {self.target}")

    def execute(self, requests: list[Any]) -> list[Any]:
        # Each forward blocks on its own responses: a thread each, so the family model sees the batch at once.
        return list(self.pool.map(self._forward, requests))

    def _forward(self, request: Any) -> Any:
        try:
            forwarded = pb_utils.InferenceRequest(
                model_name=self.target,
                requested_output_names=self.outputs,
                inputs=request.inputs(),
                request_id=request.request_id(),
            )
            final = None
            for response in forwarded.exec(decoupled=True):
                if response.has_error():
                    return pb_utils.InferenceResponse(error=_error(response.error()))
                if response.output_tensors():
                    final = response  # progress responses carry STEP/TOTAL too: the last one is the result
            if final is None or pb_utils.get_output_tensor_by_name(final, "IMAGES") is None:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.target} sent no final response"))
            wanted = [t for t in final.output_tensors() if t.name() in self.outputs]
            return pb_utils.InferenceResponse(output_tensors=wanted)
        except Exception as exc:
            pb_utils.Logger.log_error(f"{self.name}: forwarding to {self.target} failed: {exc!r}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal: forwarding failed: {exc}"))

    def finalize(self) -> None:
        self.pool.shutdown(wait=True)
