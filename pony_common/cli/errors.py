"""CLI errors: a UsageError ends the command with exit code 2 and one line of reason."""

from __future__ import annotations

import tempfile
from pathlib import Path


class UsageError(Exception):
    """Bad arguments or input named on the command line."""


def writable_folder(path: Path, fix: str) -> Path:
    """`path` as a folder this process can write into (created when missing), else a UsageError ending in `fix`."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {path}: {exc.strerror or exc}; {fix}") from None
    return path
