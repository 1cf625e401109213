"""The single-machine executor: the training entrypoint under `torchrun --standalone` as a subprocess group."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pony_common.config import Settings
from services.trainer.events import parse_event
from services.trainer.executors import OnSuccess
from services.trainer.spec import TrainSpec, parse_spec, run_output_dir
from services.trainer.store import FAILED, RUNNING, SUCCEEDED, Run, RunStore

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
KILL_GRACE_S = 10.0


def train_command(spec_path: Path, run_id: str, processes: int, launcher: str = "auto") -> list[str]:
    """The entrypoint, under `torchrun --standalone` (a one-node gloo/nccl group, even of one process) when
    `launcher` is "torchrun" or "auto" with more than one process; plain `python -m` otherwise."""
    entry = ["-m", "services.trainer.training.train", "--spec", str(spec_path), "--run-id", run_id]
    if launcher == "python" or (launcher == "auto" and processes == 1):
        return [sys.executable, *entry]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        *entry,
    ]


@dataclasses.dataclass
class _Process:
    popen: subprocess.Popen
    thread: threading.Thread
    cancelled: bool = False


class LocalExecutor:
    """Runs each training run as a local process group; a reader thread turns its stdout events into run state."""

    name = "local"

    def __init__(self, settings: Settings, store: RunStore, on_success: OnSuccess) -> None:
        self.settings = settings
        self.store = store
        self.on_success = on_success
        self._procs: dict[str, _Process] = {}
        self._lock = threading.Lock()

    def start(self, run: Run, spec: TrainSpec) -> None:
        output = Path(run_output_dir(spec, self.settings, run.id))
        output.mkdir(parents=True, exist_ok=True)
        spec_path = output / "spec.yaml"
        spec_path.write_text(spec.to_yaml())
        stderr_path = output / "train.log"
        env = {**os.environ, **self.settings.to_env()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
        env["PYTHONUNBUFFERED"] = "1"
        cmd = train_command(spec_path, run.id, spec.resources.processes_per_node, self.settings.trainer.local_launcher)
        with open(stderr_path, "ab") as err:
            popen = subprocess.Popen(
                cmd,
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
                start_new_session=True,  # its own process group: cancel kills torchrun and its workers
            )
        log.info("started local training", extra={"run_id": run.id, "pid": popen.pid, "log": str(stderr_path)})
        thread = threading.Thread(target=self._follow, args=(run.id, popen, stderr_path), daemon=True)
        with self._lock:
            self._procs[run.id] = _Process(popen, thread)
        self.store.transition(run.id, RUNNING, f"local process {popen.pid}")
        thread.start()

    def _follow(self, run_id: str, popen: subprocess.Popen, stderr_path: Path) -> None:
        done: dict[str, Any] | None = None
        assert popen.stdout is not None
        for line in popen.stdout:
            event = parse_event(line)
            if event is None:
                continue
            try:
                done = self._handle(run_id, event) or done
            except Exception:
                log.exception("could not record a training event", extra={"run_id": run_id})
        code = popen.wait()
        with self._lock:
            proc = self._procs.pop(run_id, None)
        if proc is not None and proc.cancelled:
            return
        if code == 0 and done is not None:
            try:
                self.on_success(run_id, str(done["output"]))
            except Exception as exc:
                log.exception("publishing failed", extra={"run_id": run_id})
                self.store.log(run_id, f"publishing failed: {exc}")
            self.store.transition(run_id, SUCCEEDED, f"finished at step {done.get('step', 0)}")
        else:
            self.store.transition(run_id, FAILED, f"exit code {code}: {_last_line(stderr_path)}")

    def _handle(self, run_id: str, event: dict[str, Any]) -> dict[str, Any] | None:
        kind = event["kind"]
        if kind == "step":
            self.store.record_loss(run_id, int(event["step"]), float(event["loss"]))
        elif kind == "checkpoint":
            self.store.log(run_id, f"checkpoint {event['path']}", step=int(event["step"]))
        elif kind == "stage":
            self.store.log(
                run_id,
                f"stage {event['stage']} at {event['resolution']} px: buckets {event['buckets']}, "
                f"latents encoded {event['latents_encoded']}, reused {event['latents_reused']}"
                + (f", shift {event['shift']:.3g}" if isinstance(event.get("shift"), (int, float)) else ""),
            )
        elif kind == "validation":
            self.store.log(
                run_id,
                f"validation images of stage {event.get('stage')}: {', '.join(event.get('images') or [])}",
                step=int(event["step"]),
            )
        elif kind == "start":
            how = f"resumed at step {event['step']}" if event.get("step") else "started"
            self.store.log(
                run_id,
                f"{how}: {event.get('images')} images, world size {event.get('world_size')}, "
                f"backend {event.get('backend')}, output {event.get('output')}",
                step=int(event.get("step") or 0),
            )
        elif kind == "done":
            return event
        return None

    def cancel(self, run: Run, propagation: str) -> None:
        with self._lock:
            proc = self._procs.get(run.id)
            if proc is None:
                return
            proc.cancelled = True
        _kill_group(proc.popen)
        proc.thread.join(timeout=KILL_GRACE_S + 5)

    def adopt(self, runs: list[Run]) -> None:
        """Restarts local runs an earlier controller left behind; training resumes from the latest checkpoint."""
        for run in runs:
            if run.id in self._procs:
                continue
            try:
                spec = parse_spec(run.spec)
            except Exception as exc:
                self.store.transition(run.id, FAILED, f"stored spec no longer valid: {exc}")
                continue
            self.store.log(run.id, "controller restarted: relaunching, resuming from the latest checkpoint")
            self.start(run, spec)

    def wait(self, run_id: str, timeout: float | None = None) -> None:
        """Blocks until the run's process has ended and its state is written (tests and the demo)."""
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is not None:
            proc.thread.join(timeout)

    def close(self) -> None:
        with self._lock:
            procs = list(self._procs.items())
        for run_id, proc in procs:
            # The run stays Running: the next controller's adopt() relaunches it from its latest checkpoint.
            proc.cancelled = True
            self.store.log(run_id, "controller stopped: process ended, the run resumes when the controller restarts")
            _kill_group(proc.popen)
            proc.thread.join(timeout=5)


def _kill_group(popen: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        if popen.poll() is not None:
            return
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            return
        try:
            popen.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    try:
        lines = collections.deque(path.read_text(errors="replace").splitlines(), maxlen=50)
    except OSError:
        return ""
    meaningful = [ln.strip() for ln in lines if ln.strip() and ln.strip().strip("=-*[]<> ")]
    for line in reversed(meaningful):
        if line.startswith("train:") or "Error" in line or "error" in line:
            return line[:500]
    return meaningful[-1][:500] if meaningful else ""
