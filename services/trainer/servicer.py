"""The `pony.v1.TrainerController` servicer, transport only: protos <-> the TrainerService's runs and events."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from pony.v1 import trainer_pb2, trainer_pb2_grpc
from pony_common.fields import SPEC_MAX, TOKEN_MAX, check_id, check_text
from pony_common.grpc.auth import Role
from services.trainer.evaluation import transport as eval_transport
from services.trainer.service import TrainerService
from services.trainer.store import Run, RunEvent

STATE_TO_PB = {
    "Pending": trainer_pb2.RUN_STATE_PENDING,
    "Running": trainer_pb2.RUN_STATE_RUNNING,
    "Succeeded": trainer_pb2.RUN_STATE_SUCCEEDED,
    "Failed": trainer_pb2.RUN_STATE_FAILED,
    "Cancelled": trainer_pb2.RUN_STATE_CANCELLED,
}
PB_TO_STATE = {v: k for k, v in STATE_TO_PB.items()}
KIND_TO_PB = {
    "state": trainer_pb2.RUN_EVENT_KIND_STATE,
    "loss": trainer_pb2.RUN_EVENT_KIND_LOSS,
    "log": trainer_pb2.RUN_EVENT_KIND_LOG,
}
PROPAGATION = {
    trainer_pb2.DELETE_PROPAGATION_UNSPECIFIED: "Background",
    trainer_pb2.DELETE_PROPAGATION_BACKGROUND: "Background",
    trainer_pb2.DELETE_PROPAGATION_FOREGROUND: "Foreground",
}
WATCH_POLL_S = 0.2


def _ts(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)  # SQLite returns naive datetimes; they are stored in UTC
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def run_to_pb(run: Run) -> trainer_pb2.Run:
    msg = trainer_pb2.Run(
        run_id=run.id,
        name=run.name,
        state=STATE_TO_PB.get(run.state, trainer_pb2.RUN_STATE_UNSPECIFIED),
        reason=run.reason,
        executor=run.executor,
        namespace=run.namespace,
        job_name=run.job_name,
        step=run.step,
        total_steps=run.total_steps,
        checkpoint_uri=run.checkpoint_uri,
        spec_yaml=yaml.safe_dump(run.spec, sort_keys=False),
        created_at=_ts(run.created_at),
        updated_at=_ts(run.updated_at),
    )
    if run.last_loss is not None:
        msg.last_loss = run.last_loss
    if run.model_version is not None:
        msg.model_version = run.model_version
    return msg


def event_to_pb(event: RunEvent) -> trainer_pb2.RunEvent:
    msg = trainer_pb2.RunEvent(
        event_id=event.id,
        kind=KIND_TO_PB.get(event.kind, trainer_pb2.RUN_EVENT_KIND_UNSPECIFIED),
        state=STATE_TO_PB.get(event.state, trainer_pb2.RUN_STATE_UNSPECIFIED),
        step=event.step,
        message=event.message,
        created_at=_ts(event.created_at),
    )
    if event.loss is not None:
        msg.loss = event.loss
    return msg


class TrainerControllerServicer(trainer_pb2_grpc.TrainerControllerServicer):
    # The role each method needs (pony_common.grpc.auth: generate < worker < admin); every method has one.
    ROLES = {
        "GetRun": Role.WORKER,
        "ListRuns": Role.WORKER,
        "WatchRun": Role.WORKER,
        "SubmitRun": Role.ADMIN,
        "CancelRun": Role.ADMIN,
        "EvaluateStyleAdherence": Role.ADMIN,
        "GetEvaluation": Role.WORKER,
    }

    def __init__(self, service: TrainerService) -> None:
        self.service = service

    async def SubmitRun(self, request: trainer_pb2.SubmitRunRequest, context: aio.ServicerContext):
        check_text(request.spec_yaml, "spec_yaml", SPEC_MAX)
        check_id(request.run_id, "run_id")
        run = await asyncio.to_thread(self.service.submit, request.spec_yaml, request.run_id)
        return trainer_pb2.SubmitRunResponse(run=run_to_pb(run))

    async def GetRun(self, request: trainer_pb2.GetRunRequest, context: aio.ServicerContext):
        check_id(request.run_id, "run_id")
        run = await asyncio.to_thread(self.service.get, request.run_id)
        return trainer_pb2.GetRunResponse(run=run_to_pb(run))

    async def ListRuns(self, request: trainer_pb2.ListRunsRequest, context: aio.ServicerContext):
        check_id(request.page_token, "page_token", TOKEN_MAX)
        states = tuple(PB_TO_STATE.get(s, f"unknown({s})") for s in request.states)
        runs, token = await asyncio.to_thread(self.service.list_runs, states, request.page_size, request.page_token)
        return trainer_pb2.ListRunsResponse(runs=[run_to_pb(r) for r in runs], next_page_token=token)

    async def CancelRun(self, request: trainer_pb2.CancelRunRequest, context: aio.ServicerContext):
        check_id(request.run_id, "run_id")
        propagation = PROPAGATION.get(request.propagation, "unknown")
        run = await asyncio.to_thread(self.service.cancel, request.run_id, propagation)
        return trainer_pb2.CancelRunResponse(run=run_to_pb(run))

    async def EvaluateStyleAdherence(
        self, request: trainer_pb2.EvaluateStyleAdherenceRequest, context: aio.ServicerContext
    ) -> trainer_pb2.EvaluateStyleAdherenceResponse:
        eval_request = eval_transport.request_from_pb(request)
        outcome = await asyncio.to_thread(self.service.evaluate, eval_request)
        return eval_transport.response_to_pb(outcome)

    async def GetEvaluation(
        self, request: trainer_pb2.GetEvaluationRequest, context: aio.ServicerContext
    ) -> trainer_pb2.GetEvaluationResponse:
        eval_transport.check_get(request)
        service = self.service
        return await asyncio.to_thread(eval_transport.get_evaluation, service.catalog, service.settings, request)

    async def WatchRun(
        self, request: trainer_pb2.WatchRunRequest, context: aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.WatchRunResponse]:
        check_id(request.run_id, "run_id")
        run = await asyncio.to_thread(self.service.get, request.run_id)
        yield trainer_pb2.WatchRunResponse(run=run_to_pb(run))
        after = request.after_event_id
        while True:
            events = await asyncio.to_thread(self.service.events, request.run_id, after)
            run = await asyncio.to_thread(self.service.get, request.run_id)
            for event in events:
                after = event.id
                yield trainer_pb2.WatchRunResponse(run=run_to_pb(run), event=event_to_pb(event))
            if run.terminal and not events:
                return
            if not events:
                await asyncio.sleep(WATCH_POLL_S)
