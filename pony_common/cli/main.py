"""Entry point of `ponyctl`: parses arguments, reads the settings once, dispatches to a command module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from pony_common.cli.errors import UsageError
from pony_common.config import ConfigError, Settings
from pony_common.errors import InvalidArgument, PonyError

# Each module defines `register(subparsers)`; the parser it adds sets `func(args, settings) -> int`. The verbs of
# the service packages come from their `pony.cli` entry points (pyproject.toml), so this package names none of them.
CLI_ENTRY_POINTS = "pony.cli"
COMMAND_MODULES = ["pony_common.cli.worker"]


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        from pony_common.logs import setup_logging

        setup_logging(settings.log_level, settings.log_json)
        return int(args.func(args, settings) or 0)
    except (UsageError, ConfigError, InvalidArgument) as exc:
        sys.stderr.write(f"ponyctl {args.command}: {exc}\n")
        return 2
    except PonyError as exc:
        sys.stderr.write(f"ponyctl {args.command}: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
