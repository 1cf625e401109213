"""`SafetyClient`: the blocking `check` and the asyncio `acheck` against a served safety service."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pony.v1 import safety_pb2
from pony_common.config import Settings
from pony_common.testing import ServerLoop
from services.safety.app import create_service
from services.safety.client import SafetyClient


def test_check_and_acheck_return_the_verdicts_and_errors_are_rpc_errors(model_settings: Settings) -> None:
    request = safety_pb2.CheckRequest(items=[safety_pb2.SafetyItem(item_id="a", caption="solo, loli")])
    with ServerLoop() as servers:
        running = servers.start(model_settings, create_service(model_settings))
        client = SafetyClient(model_settings, f"127.0.0.1:{running.port}")
        try:
            (result,) = client.check(request).results
            assert result.item_id == "a" and result.decision == safety_pb2.DECISION_BLOCK
            with pytest.raises(grpc.RpcError) as err:
                client.check(safety_pb2.CheckRequest())
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            async def on_a_loop() -> safety_pb2.CheckResponse:
                try:
                    return await client.acheck(request, timeout=30)
                finally:
                    await client.aclose()

            (again,) = asyncio.run(on_a_loop()).results
            assert again.decision == safety_pb2.DECISION_BLOCK and [r.rule_id for r in again.reasons] == [
                "tags.blocked"
            ]
        finally:
            client.reset()
