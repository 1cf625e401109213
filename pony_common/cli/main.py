"""Entry point of `ponyctl`: parses arguments, reads the settings once, sets up logging, dispatches to a command
module, and turns whatever a command raises into one line on stderr and an exit code (2: bad input, 1: else)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import ConfigError, Settings, warn_unknown_variables
from pony_common.errors import InvalidArgument, PonyError
from pony_common.logs import (
    CLI_LOG_FILE,
    LOG_FOLDER,
    TERMINAL_OFF,
    quiet_libraries,
    root_logging_restored,
    setup_cli_logging,
    setup_logging,
)

# Each module defines `register(subparsers)`; the parser it adds sets `func(args, settings) -> int`. The verbs of
# the service packages come from their `pony.cli` entry points (pyproject.toml), so this package names none of them.
CLI_ENTRY_POINTS = "pony.cli"
COMMAND_MODULES = ["pony_common.cli.worker"]

# Where a verb's logs go, set with `parser.set_defaults(logs=...)`:
#   "file" (the default): a person at a terminal: records to <state_dir>/logs/ponyctl.log, warnings on stderr above
#       the progress bars, library chatter off unless PONY_LOG_LEVEL=DEBUG;
#   "terminal": the same without the file (the verb writes its own, as the demo does);
#   "stderr": every record on stderr as JSON lines, for a log collector (serve, worker).
LOG_MODES = ("file", "terminal", "stderr")

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line of reason, exit code 2.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ponyctl", description="Pony Platform: curate, train and serve Pony models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    modules = [*COMMAND_MODULES, *sorted(ep.value for ep in entry_points(group=CLI_ENTRY_POINTS))]
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def _say(command: str, message: object) -> None:
    """The one line a failed command leaves on stderr."""
    text = " ".join(str(message).split()) or "failed"
    sys.stderr.write(f"ponyctl {command}: {text}\n")


def setup_command_logging(args: argparse.Namespace, settings: Settings) -> Path | None:
    """Logging for the verb in `args` (see LOG_MODES); returns where its records go: the log file, or None for
    stderr (mode "stderr") or nowhere of ours (mode "terminal")."""
    mode = getattr(args, "logs", "file")
    if mode not in LOG_MODES:
        raise ValueError(f"logs={mode!r} is not one of {LOG_MODES}")
    if mode == "stderr":
        setup_logging(settings.log_level, settings.log_json)
        if settings.log_level.strip().upper() != "DEBUG":
            quiet_libraries()  # no progress bars or library lines inside the JSON stream
        return None
    path = Path(settings.state_dir) / LOG_FOLDER / CLI_LOG_FILE if mode == "file" else None
    setup_cli_logging(settings.log_level, settings.log_json, args.command, path)
    return path


def _internal_error(args: argparse.Namespace, exc: Exception, log_path: Path | None, debug: bool) -> int:
    """An exception no command expects: its traceback to the log (with DEBUG also to the terminal), one line to
    stderr naming where the details are."""
    on_stderr = getattr(args, "logs", "file") == "stderr"  # the log record, traceback included, is on stderr
    log.error("ponyctl %s failed", args.command, exc_info=exc, extra={TERMINAL_OFF: True})
    if debug and not on_stderr:
        traceback.print_exception(exc, file=sys.stderr)
    where = []
    if on_stderr:
        where.append("details in the log record above")
    elif log_path is not None and log_path.is_file():
        where.append(f"details in {log_path}")
    if not debug:
        where.append("rerun with PONY_LOG_LEVEL=DEBUG for the traceback")
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:299] + "…"
    suffix = f" ({'; '.join(where)})" if where else ""
    _say(args.command, f"internal error: {type(exc).__name__}: {text}{suffix}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's core reads its log level once, when grpc is first imported (by the verbs' modules): unless DEBUG, its
    # INFO lines ("Got goaway ...") stay off the terminal and out of JSON log streams, here and in child processes.
    if os.environ.get("PONY_LOG_LEVEL", "").strip().upper() != "DEBUG":
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        _say(args.command, exc)
        return 2
    with root_logging_restored():
        log_path = setup_command_logging(args, settings)
        warn_unknown_variables(settings)
        return _run(args, settings, log_path)


def _run(args: argparse.Namespace, settings: Settings, log_path: Path | None) -> int:
    """The verb, and what it raised as one line on stderr and an exit code."""
    command = args.command
    debug = settings.log_level.strip().upper() == "DEBUG"
    try:
        return int(args.func(args, settings) or 0)
    except (UsageError, ConfigError, InvalidArgument) as exc:
        _say(command, exc)
        return 2
    except PonyError as exc:
        _say(command, exc)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.filename is None:
            return _internal_error(args, exc, log_path, debug)
        # The machine said no (a full disk, a permission): no bug, no traceback; the path says where.
        log.warning("ponyctl %s failed", command, exc_info=exc, extra={TERMINAL_OFF: True})
        _say(command, f"{exc.strerror or exc}: {exc.filename}")
        return 1
    except Exception as exc:
        return _internal_error(args, exc, log_path, debug)


if __name__ == "__main__":
    raise SystemExit(main())
