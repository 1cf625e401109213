"""The safety service's ponyctl verbs: codex import|export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pony_common.cli.errors import UsageError
from pony_common.config import Settings


def register(sub: argparse._SubParsersAction) -> None:
    _register_codex(sub)


def _register_codex(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("codex", help="the character codex (import/export YAML)")
    csub = p.add_subparsers(dest="codex_command", required=True, parser_class=type(p))
    imp = csub.add_parser("import", help="make FILE the codex (a new version unless nothing changed)")
    imp.add_argument("file", help="codex YAML: characters: [{name, aliases, franchise, age_class, real_person}]")
    imp.add_argument("--merge", action="store_true", help="add/update FILE's characters, keep the others")
    imp.add_argument("--note", default="", help="note stored with the new version")
    imp.set_defaults(func=run_import)
    exp = csub.add_parser("export", help="write the current codex to FILE ('-' = stdout)")
    exp.add_argument("file", help="YAML file to write ('-' = stdout)")
    exp.set_defaults(func=run_export)


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.catalog.db import catalog_for
    from services.safety.codex import CodexFormatError, parse_codex
    from services.safety.store import CodexStore

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        characters = parse_codex(text, source=str(path))
        version, changed = CodexStore(catalog_for(settings.database_url)).import_characters(
            characters, note=args.note or f"import {path.name}", merge=args.merge
        )
    except CodexFormatError as exc:
        raise UsageError(str(exc)) from None
    state = "imported" if changed else "unchanged"
    print(f"codex v{version}: {state}, {len(characters)} characters from {path}")
    return 0


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    from pony_common.catalog.db import catalog_for
    from services.safety.codex import dump_codex
    from services.safety.store import CodexStore

    codex = CodexStore(catalog_for(settings.database_url)).load()
    text = dump_codex(codex.characters, codex.version)
    if args.file == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.file)
    if not path.parent.is_dir():
        raise UsageError(f"folder {path.parent} does not exist")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"codex v{codex.version}: {len(codex.characters)} characters to {path}", file=sys.stderr)
    return 0
