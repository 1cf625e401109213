"""What an operator sees when something is off: the real `ponyctl` in its own process answers each mistake with one
line on stderr (exit 2 for bad input, naming the fix; exit 1 otherwise) and no traceback; logs go to the log file
or above the progress bars, never inside them; library chatter stays off the terminal unless PONY_LOG_LEVEL=DEBUG;
a misspelt PONY_* variable is named once, with the setting it was probably meant to be."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pony_common.config import LOG_LEVELS, ConfigError, Settings, check_log_level, unknown_variables
from pony_common.logs import QUIET_ENVIRONMENT
from tests.samples import png_bytes

ROOT = Path(__file__).resolve().parents[2]


def ponyctl(state: Path, *args: str, env: dict[str, str] | None = None, code: str = "") -> subprocess.CompletedProcess:
    """`ponyctl ARGS` (or `python -c CODE ARGS`) with a state folder of its own and no PONY_* but `env`'s."""
    # Without what an earlier in-process `main` may have set (QUIET_ENVIRONMENT): the command decides that itself.
    base = {k: v for k, v in os.environ.items() if not k.startswith("PONY_") and k not in QUIET_ENVIRONMENT}
    base.update({"PONY_STATE_DIR": str(state), **(env or {})})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "pony_common.cli.main", *args]
    return subprocess.run(cmd, cwd=ROOT, env=base, capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The single stderr line of a command that exited with `code`, holding each of `words`."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def segments(stderr: str) -> list[str]:
    """What a terminal shows of stderr: a carriage return starts the line over, so bars and lines split there."""
    return [s.strip() for s in re.split(r"[\r\n]", stderr) if s.strip()]


def log_records(state: Path) -> list[dict]:
    path = state / "logs" / "ponyctl.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- bad input: exit 2, one line naming the fix ---


def test_an_unwritable_models_folder_exits_2_naming_the_fix(tmp_path: Path) -> None:
    proc = ponyctl(tmp_path / "state", "models", "tiny", "/proc/pony-models")
    one_line(proc, 2, "ponyctl models:", "cannot write to /proc/pony-models", "ponyctl models tiny DIR")
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    proc = ponyctl(tmp_path / "state", "models", "tiny", str(a_file))
    one_line(proc, 2, f"{a_file} exists and is not a folder", "ponyctl models tiny DIR")


def test_a_bogus_log_level_exits_2_listing_the_levels(tmp_path: Path) -> None:
    proc = ponyctl(tmp_path / "state", "models", "tiny", str(tmp_path / "m"), env={"PONY_LOG_LEVEL": "LOUD"})
    one_line(proc, 2, "PONY_LOG_LEVEL='LOUD' is not a log level", "use one of DEBUG, INFO, WARNING, ERROR")
    assert not (tmp_path / "m").exists()


def test_log_levels_are_checked_where_the_environment_is_read() -> None:
    assert [check_log_level(level.lower()) for level in LOG_LEVELS] == list(LOG_LEVELS)
    assert Settings.from_env({"PONY_LOG_LEVEL": "debug"}).log_level == "debug"
    with pytest.raises(ConfigError, match="PONY_LOG_LEVEL='verbose' is not a log level"):
        Settings.from_env({"PONY_LOG_LEVEL": "verbose"})


# --- misspelt variables ---


def test_unknown_variables_name_the_closest_setting_and_valid_names_pass() -> None:
    every_setting = {name: "" for name, _, _ in Settings.env_names()}
    assert unknown_variables(every_setting) == []
    # Read by name outside Settings (the test suite, the training entrypoint): not misspellings.
    not_settings = {"PONY_TEST_POSTGRES_URL": "x", "PONY_REQUIRE_SERVICES": "1", "PONY_TRAIN_SPEC": "x"}
    assert unknown_variables(not_settings) == []
    assert unknown_variables({"PONY_DATBASE_URL": "x", "PONY_SAMPLER_MAXSTEPS": "5", "PONY_FROBNICATE": "1"}) == [
        "PONY_DATBASE_URL is not a setting; did you mean PONY_DATABASE_URL?",
        'PONY_FROBNICATE is not a setting; the settings are listed in README.md, "Configuration"',
        "PONY_SAMPLER_MAXSTEPS is not a setting; did you mean PONY_SAMPLER_MAX_STEPS?",
    ]


def test_a_misspelt_variable_is_warned_once_and_valid_ones_are_not(tmp_path: Path) -> None:
    env = {"PONY_DATBASE_URL": "sqlite:///x.db", "PONY_SAMPLER_MAX_STEPS": "50", "PONY_LOG_LEVEL": "INFO"}
    proc = ponyctl(tmp_path / "state", "models", "triton-repo", str(tmp_path / "repo"), env=env)
    line = one_line(proc, 0, "ponyctl models: warning:")
    assert line.endswith("PONY_DATBASE_URL is not a setting; did you mean PONY_DATABASE_URL?")
    assert "pony_v7\t1\t" in proc.stdout


def test_serve_and_worker_warn_in_their_json_log(tmp_path: Path) -> None:
    proc = ponyctl(tmp_path / "state", "worker", "--queues", "nope", env={"PONY_WORKER_CONCURENCY": "2"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    warning, error = proc.stderr.splitlines()
    record = json.loads(warning)
    assert record["level"] == "warning"
    assert record["msg"] == "PONY_WORKER_CONCURENCY is not a setting; did you mean PONY_WORKER_CONCURRENCY?"
    assert error.startswith("ponyctl worker: unknown queue(s) nope")


# --- anything else: exit 1, one line ---

# No verb fails unexpectedly on purpose, so this one is made to: the real entry point, one verb replaced.
BROKEN_VERB = """
import sys
import services.stack.cli
from pony_common.cli.main import main

def broken(args, settings):
    raise RuntimeError("the tiny models went\\nmissing")

services.stack.cli.run_tiny = broken
sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_exception_is_one_line_and_the_traceback_is_in_the_log(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = ponyctl(state, "models", "tiny", str(tmp_path / "m"), code=BROKEN_VERB)
    log_file = state / "logs" / "ponyctl.log"
    one_line(
        proc,
        1,
        "ponyctl models: internal error: RuntimeError: the tiny models went missing",
        f"details in {log_file}",
        "rerun with PONY_LOG_LEVEL=DEBUG",
    )
    (record,) = [r for r in log_records(state) if r["level"] == "error"]
    assert "Traceback" in record["exc"] and "RuntimeError: the tiny models went" in record["exc"]

    proc = ponyctl(state, "models", "tiny", str(tmp_path / "m"), env={"PONY_LOG_LEVEL": "DEBUG"}, code=BROKEN_VERB)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback")
    assert proc.stderr.splitlines()[-1] == (
        f"ponyctl models: internal error: RuntimeError: the tiny models went missing (details in {log_file})"
    )


# --- logs, progress bars and library chatter ---


def test_a_warning_during_a_progress_bar_is_a_line_of_its_own_and_the_log_goes_to_the_file(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for i in range(4):
        (source / f"img{i}.png").write_bytes(png_bytes((40 * i, 90, 200)))
        (source / f"img{i}.txt").write_text("pony, solo")
    (source / "img2b.png").write_bytes(b"not an image")  # decoded between the others: a warning mid-bar
    state = tmp_path / "state"
    proc = ponyctl(state, "ingest", str(source), "--no-wait")
    assert proc.returncode == 0, proc.stderr
    shown = segments(proc.stderr)
    bars = [s for s in shown if s.startswith("store:")]
    warnings = [s for s in shown if s.startswith("ponyctl ingest: warning: ")]
    assert bars and warnings, proc.stderr
    # Every piece is either a bar or a whole log line: no log line inside a bar, no JSON on the terminal.
    assert len(bars) + len(warnings) == len(shown), shown
    assert not any("ponyctl" in bar or "{" in bar for bar in bars), shown
    records = log_records(state)
    assert any(r["level"] == "warning" and r["logger"].startswith("services.curation") for r in records)
    assert any(r["level"] == "info" for r in records)  # the file has the records the terminal does not show


def test_library_chatter_stays_off_the_terminal_unless_debug(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = ponyctl(state, "models", "tiny", str(tmp_path / "quiet"), env={"PONY_LOG_LEVEL": "INFO"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert any(r["logger"] == "services.stack.tiny" for r in log_records(state))
    # DEBUG shows what the libraries say (transformers' save bars here) and the log lines, each on its own line.
    proc = ponyctl(state, "models", "tiny", str(tmp_path / "loud"), env={"PONY_LOG_LEVEL": "DEBUG"})
    assert proc.returncode == 0, proc.stderr
    shown = segments(proc.stderr)
    bars = [s for s in shown if "|" in s and "it/s" in s]
    lines = [s for s in shown if s.startswith("ponyctl models: ")]
    assert bars and any("wrote tiny models" in s for s in lines), shown
    assert not any("ponyctl" in bar for bar in bars), shown


QUIET_PROBE = """
import sys
from pony_common.logs import setup_cli_logging

setup_cli_logging(sys.argv[1], True, "probe", None)
import diffusers.utils.logging as d  # imported after the setup: the import hook quiets it
import transformers.utils.logging as t

print(d.is_progress_bar_enabled(), d.get_verbosity(), t.is_progress_bar_enabled(), t.get_verbosity())
"""


@pytest.mark.parametrize(("level", "expected"), [("INFO", "False 40 False 40"), ("DEBUG", "True 30 True 30")])
def test_libraries_imported_after_the_setup_are_quiet_unless_debug(tmp_path: Path, level: str, expected: str) -> None:
    proc = ponyctl(tmp_path, level, code=QUIET_PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()


# gRPC's core reads GRPC_VERBOSITY once, when grpc is imported: `main` sets it before the verbs' modules import grpc.
GRPC_PROBE = """
import os
import sys

os.environ.pop("GRPC_VERBOSITY", None)
import pony_common.cli.main as cli

real_build_parser = cli.build_parser


def probed():
    print(os.environ.get("GRPC_VERBOSITY", "-"), "grpc" in sys.modules, flush=True)
    return real_build_parser()


cli.build_parser = probed
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("level", "expected"), [("INFO", "ERROR False"), ("DEBUG", "- False")])
def test_grpc_core_logs_stay_off_the_terminal_unless_debug(tmp_path: Path, level: str, expected: str) -> None:
    proc = ponyctl(tmp_path, "models", "--help", env={"PONY_LOG_LEVEL": level}, code=GRPC_PROBE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == expected


def serve_until(tmp_path: Path, models: Path, marker: str, **env: str) -> str:
    """`ponyctl serve scorer` on loopback until a stderr line holds `marker`, then Ctrl-C: its whole stderr, once
    it has exited 0 with no traceback."""
    from tests.conftest import free_port

    base = {k: v for k, v in os.environ.items() if not k.startswith("PONY_") and k not in QUIET_ENVIRONMENT}
    base.update(PONY_STATE_DIR=str(tmp_path / "state"), PONY_MODELS_DIR=str(models), PONY_BIND_HOST="127.0.0.1")
    base.update(env)
    cmd = [sys.executable, "-m", "pony_common.cli.main", "serve", "scorer", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=base, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in iter(proc.stderr.readline, ""):  # ends when the process exits
            seen.append(line)
            if marker in line:
                break
        assert any(marker in line for line in seen), "".join(seen)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = "".join(seen) + rest
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr
    return stderr


def test_serve_stops_cleanly_on_ctrl_c_after_its_model_failed_to_load(tmp_path: Path) -> None:
    """A server whose load has no try left keeps serving health (liveness NOT_SERVING); Ctrl-C then stops it with
    exit 0 and JSON lines only: no "Task exception was never retrieved" traceback."""
    stderr = serve_until(tmp_path, tmp_path / "no-models", "no try left", PONY_MODEL_LOAD_ATTEMPTS="1")
    assert all(json.loads(line)["level"] for line in stderr.splitlines()), stderr


def test_serve_logs_only_json_lines_while_loading_a_model(tmp_path: Path, tiny_models: Path) -> None:
    """No library progress bar ("Loading weights") inside the JSON stream a log collector reads."""
    stderr = serve_until(tmp_path, tiny_models, '"ready"')
    records = [json.loads(line) for line in stderr.splitlines()]
    assert [r["msg"] for r in records if r["msg"] in ("ready", "shutting down")] == ["ready", "shutting down"]


def test_a_service_that_is_not_running_is_one_line_naming_how_to_start_it(tmp_path: Path) -> None:
    from tests.conftest import free_port

    nobody = f"127.0.0.1:{free_port()}"
    env = {"PONY_SAMPLER_ADDR": nobody, "PONY_TRAINER_ADDR": nobody, "PONY_RPC_RETRIES": "2"}
    out = str(tmp_path / "pony.png")
    proc = ponyctl(tmp_path / "state", "generate", "a pony", "--out", out, "--timeout", "5", env=env)
    one_line(proc, 1, "ponyctl generate:", "UNAVAILABLE", "`ponyctl serve sampler`", "PONY_SAMPLER_ADDR")
    proc = ponyctl(tmp_path / "state", "train", "list", env=env)
    one_line(proc, 1, "ponyctl train:", "`ponyctl serve trainer`", "PONY_TRAINER_ADDR", "--local")
