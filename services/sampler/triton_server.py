"""Runs `tritonserver` from the nvidia-pytriton wheel on a single machine: binary, Python-backend stub and the
environment that lets the stub's interpreter find torch, diffusers and our code; ports and repository from config."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from pony_common.config import Settings
from pony_common.errors import DependencyUnavailable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def wheel_dir() -> Path:
    """The tritonserver distribution inside the nvidia-pytriton wheel."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def wheel_libs() -> Path:
    """The shared libraries the wheel bundles (libtritonserver, its dependencies)."""
    import pytriton

    return Path(pytriton.__file__).parents[1] / "nvidia_pytriton.libs"


def prepare_backends(target: Path) -> Path:
    """A backend directory with the Python backend and the stub built for this interpreter's version."""
    dist = wheel_dir()
    stub = dist / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stub / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"the nvidia-pytriton wheel has no Python backend stub for {sys.version_info[:2]}")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        _copy_if_changed(dist / "backends" / "python" / name, python / name)
    _copy_if_changed(stub, python / "triton_python_backend_stub")
    os.chmod(python / "triton_python_backend_stub", 0o755)
    return target


def _copy_if_changed(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.stat().st_mtime >= src.stat().st_mtime:
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def stub_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python stub need.

    The stub embeds an isolated interpreter (PYTHONPATH is ignored) that links libpython3.11: the running
    interpreter's LIBDIR goes first on LD_LIBRARY_PATH (else C extensions fail with `undefined symbol`),
    then the wheel's libraries. The interpreter finds its prefix by looking up `python3` on PATH, so this
    environment's bin folder goes first on PATH: the stub then runs with this virtualenv's site-packages.
    PYTHONPATH names the repository root for model.py to add when the package is not installed.
    OMP_WAIT_POLICY defaults to PASSIVE."""
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [p for p in (libdir, str(wheel_libs()), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "/usr/bin:/bin")])
    # The stub shares the machine's cores with the services: idle OpenMP workers sleep instead of spinning.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    site_packages = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), site_packages) if p)
    return env


class TritonProcess:
    """A tritonserver child process in explicit model-control mode on the configured ports."""

    def __init__(self, settings: Settings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.binary = (
            Path(settings.sampler.triton_bin) if settings.sampler.triton_bin else wheel_dir() / "bin" / "tritonserver"
        )
        self.state = Path(settings.state_dir)
        self.log_path = log_path or self.state / "logs" / "tritonserver.log"
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.sampler.triton_http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.settings.sampler.triton_grpc_port}"

    def command(self) -> list[str]:
        s = self.settings
        backends = prepare_backends(self.state / "triton-backends")
        return [
            str(self.binary),
            f"--model-repository={s.sampler.triton_repo}",
            "--model-control-mode=explicit",
            f"--backend-directory={backends}",
            f"--http-port={s.sampler.triton_http_port}",
            f"--grpc-port={s.sampler.triton_grpc_port}",
            f"--metrics-port={s.sampler.triton_metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=30",
            "--log-verbose=0",
        ]

    def start(self, timeout: float | None = None) -> None:
        """Starts tritonserver and waits until it is live; raises DependencyUnavailable if it is not."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log.info("starting tritonserver", extra={"cmd": " ".join(cmd)})
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=stub_environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + (timeout or self.settings.sampler.triton_start_timeout_s)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DependencyUnavailable(f"tritonserver exited with {self.proc.returncode}; see {self.log_path}")
            if self.live():
                log.info("tritonserver live", extra={"pid": self.proc.pid, "grpc": self.grpc_url})
                return
            time.sleep(0.2)
        self.stop()
        raise DependencyUnavailable(f"tritonserver did not come up in time; see {self.log_path}")

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/live", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM (Triton unloads its models, finishing in-flight requests), then SIGKILL after `grace`."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("tritonserver did not stop in time; killing its process group")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (tests of Triton going away)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
