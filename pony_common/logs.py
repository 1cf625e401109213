"""Structured logging: one JSON object per line, carrying the request id and the trace id when there is one.

Servers and workers log every record to stderr (`setup_logging`), which their log collector reads. A command a
person runs at a terminal (`setup_cli_logging`) logs to a file under `<state_dir>/logs` and shows only warnings,
one readable line each, written above any progress bar; third-party chatter is silenced there (`quiet_libraries`)
unless the log level is DEBUG."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("pony_request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def _trace_id() -> str:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return ""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; `extra={...}` fields are kept."""

    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        tid = _trace_id()
        if tid:
            out["trace_id"] = tid
        for key, value in record.__dict__.items():
            if key not in self._skip and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", json_lines: bool = True) -> None:
    """Configures the root logger once per process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(json_lines))
    _install([handler], level)


# --- a person at a terminal ---

LOG_FOLDER = "logs"
CLI_LOG_FILE = "ponyctl.log"
# Records logged with `extra={TERMINAL_OFF: True}` go to the log file only (the CLI says it in its own words).
TERMINAL_OFF = "_pony_file_only"
# Loggers that report routine steps at INFO (migrations, HTTP requests): WARNING at a terminal unless DEBUG.
CHATTY_LOGGERS = ("alembic", "httpx", "httpcore", "urllib3", "filelock")
# Inherited by the processes a command starts (workers, tritonserver) and read by the libraries when imported.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


class TerminalHandler(logging.Handler):
    """One readable line per record on stderr, written through `tqdm.write` so that it lands above any progress
    bar instead of inside it. Tracebacks stay in the log file unless the level is DEBUG."""

    def __init__(self, command: str, level: int) -> None:
        super().__init__(level)
        self.command = command
        self.addFilter(lambda record: not getattr(record, TERMINAL_OFF, False))

    def format(self, record: logging.LogRecord) -> str:
        extras = {k: v for k, v in record.__dict__.items() if k not in JsonFormatter._skip and not k.startswith("_")}
        text = record.getMessage()
        if extras:
            text += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        line = f"ponyctl {self.command}: {record.levelname.lower()}: {text}"
        if record.exc_info and self.level <= logging.DEBUG:
            line += "\n" + logging.Formatter().formatException(record.exc_info)
        return line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


class LogFile(logging.FileHandler):
    """Appends to `path`, creating it and its folder with the first record, so a command that logs nothing leaves
    no file. A file that cannot be written drops the records instead of failing the command (`opened` says)."""

    def __init__(self, path: Path) -> None:
        self.failed = False
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self) -> Any:
        if self.failed:
            return None
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            return super()._open()
        except OSError:
            self.failed = True
            return None

    @property
    def opened(self) -> bool:
        return self.stream is not None


def setup_cli_logging(level: str, json_lines: bool, command: str, log_file: Path | None) -> LogFile | None:
    """Logging for a command run at a terminal: every record at `level` to `log_file` (when given), warnings and
    errors on stderr above the progress bars (with DEBUG: every record, and tracebacks); library chatter off
    unless DEBUG. Returns the file handler."""
    debug = level.strip().upper() == "DEBUG"
    terminal = TerminalHandler(command, logging.DEBUG if debug else logging.WARNING)
    handlers: list[logging.Handler] = [terminal]
    file_handler = None
    if log_file is not None:
        file_handler = LogFile(log_file)
        file_handler.setFormatter(_formatter(json_lines))
        handlers.append(file_handler)
    _install(handlers, level)
    if not debug:
        quiet_libraries()
    return file_handler


def quiet_libraries() -> None:
    """transformers, diffusers and huggingface_hub: errors only, no progress bars; the chatty loggers at WARNING.
    Applied to the libraries already imported and, through an import hook, to those imported later (importing
    them here would cost seconds for every command)."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes (pulled in by diffusers' quantizer registry when a LoRA-capable pipeline class is imported) warns
    # at import, on CPUs with AVX512-BF16, that an optional 4-bit CPU kernel package is missing: nothing here uses
    # 4-bit layers, so only its errors are shown.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    after_import("transformers.utils.logging", _quiet_hf_library)
    after_import("diffusers.utils.logging", _quiet_hf_library)
    after_import("huggingface_hub.utils", lambda module: module.disable_progress_bars())


def _quiet_hf_library(logging_module: ModuleType) -> None:
    logging_module.set_verbosity_error()
    logging_module.disable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback once a module has been executed (at most once per module)."""

    def __init__(self) -> None:
        self.pending: dict[str, Callable[[ModuleType], None]] = {}
        self._finding: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.pending or fullname in self._finding:
            return None
        self._finding.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)  # what the other finders find
        finally:
            self._finding.discard(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, lambda module: self.pending.pop(fullname, _ignore)(module))
        return spec


def _ignore(module: ModuleType) -> None:
    pass


class _ThenCall(importlib.abc.Loader):
    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.callback = callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self.loader, name)


_after_import = _AfterImport()


def after_import(module: str, callback: Callable[[ModuleType], None]) -> None:
    """`callback(module)` now if `module` is imported, else right after it is."""
    if module in sys.modules:
        callback(sys.modules[module])
        return
    _after_import.pending[module] = callback
    if _after_import not in sys.meta_path:
        sys.meta_path.insert(0, _after_import)


@contextlib.contextmanager
def root_logging_restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before the block, those added in it closed (a command
    run in-process, as the tests do, leaves the caller's logging as it found it)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _formatter(json_lines: bool) -> logging.Formatter:
    return JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")


def _install(handlers: list[logging.Handler], level: str) -> None:
    """Replaces the root logger's handlers (closing those replaced) and sets its level."""
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LogFile | TerminalHandler):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level.strip().upper())
