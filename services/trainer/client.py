"""The typed client of `pony.v1.TrainerController` (what `ponyctl train` and other deployables call).

client = TrainerClient(settings)                       # settings.trainer_addr, bearer token, TLS, retries
run = client.submit_run(spec_yaml).run                 # then get_run / list_runs / cancel_run
for item in client.watch_run(run.run_id): ...          # the run, then (run, event) until it ends

Methods return the `pony.v1` response messages; errors are grpc.RpcError (INVALID_ARGUMENT names the field).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pony.v1 import trainer_pb2, trainer_pb2_grpc
from pony_common.grpc.client import ServiceClient


class TrainerClient(ServiceClient):
    SERVICE = "trainer"
    STUB = trainer_pb2_grpc.TrainerControllerStub

    def submit_run(self, spec_yaml: str, run_id: str = "") -> trainer_pb2.SubmitRunResponse:
        return self.stub.SubmitRun(trainer_pb2.SubmitRunRequest(spec_yaml=spec_yaml, run_id=run_id))

    def get_run(self, run_id: str) -> trainer_pb2.GetRunResponse:
        return self.stub.GetRun(trainer_pb2.GetRunRequest(run_id=run_id))

    def list_runs(
        self, states: Sequence[int] = (), page_size: int = 0, page_token: str = ""
    ) -> trainer_pb2.ListRunsResponse:
        """`states` are `trainer_pb2.RunState` values (none: every state), newest run first."""
        return self.stub.ListRuns(
            trainer_pb2.ListRunsRequest(states=states, page_size=page_size, page_token=page_token)
        )

    def cancel_run(
        self, run_id: str, propagation: int = trainer_pb2.DELETE_PROPAGATION_BACKGROUND
    ) -> trainer_pb2.CancelRunResponse:
        return self.stub.CancelRun(trainer_pb2.CancelRunRequest(run_id=run_id, propagation=propagation))

    def watch_run(
        self, run_id: str, after_event_id: int = 0, timeout: float | None = None
    ) -> Iterator[trainer_pb2.WatchRunResponse]:
        """The run now, then the run with each new event after `after_event_id`, until the run has ended."""
        request = trainer_pb2.WatchRunRequest(run_id=run_id, after_event_id=after_event_id)
        return self.stub.WatchRun(request, timeout=self.deadline(timeout))
