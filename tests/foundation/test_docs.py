"""What the docs tell a newcomer to type or open exists: every `ponyctl ...` written in README.md, docs/*.md and
services/*/README.md names real verbs and real flags of the real parser (the command lines of code blocks parse as
written), and every repository path or relative link they name is there."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from pony_common.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "services").glob("*/README.md")])
# Top-level folders a path written in the docs is taken relative to the repository root from.
ROOTED = ("services/", "pony_common/", "deploy/", "docs/", "tests/", "bench/", "scripts/", "protos/", ".ci/")


def _doc_ids() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in DOCS]


def _code_lines(text: str) -> list[str]:
    """Lines of indented or fenced code that are a `ponyctl` command (not a message it prints, `ponyctl verb: ...`, nor
    a diagram's `ponyctl a / b`), without their comment and a trailing `&`."""
    lines = []
    for line in text.splitlines():
        code = line.split("  #")[0].strip().removesuffix("&").strip()
        words = code.split()
        command = words[:1] == ["ponyctl"] and len(words) > 1 and not words[1].endswith(":") and "/" not in words
        if command and "`" not in code and "|" not in code:
            lines.append(code)
    return lines


def _spans(text: str) -> list[str]:
    """`ponyctl ...` in inline code (which may wrap over a line) and the `ponyctl` lines of indented or fenced code."""
    # A table cell writes `a|b` as `a\|b`.
    spans = [" ".join(s.replace("\\|", "|").split()) for s in re.findall(r"`(ponyctl [^`]+)`", text)]
    return spans + _code_lines(text)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[argparse.ArgumentParser], list[str]]:
    """The parsers a command's leading words select (a `a|b` word: each of them), and the words left over."""
    parsers = [parser]
    while words:
        choices = _subparsers(parsers[0])
        if not choices:
            break
        names = words[0].split("|")
        if not all(n in choices for n in names):
            break
        parsers = [choices[n] for n in names]
        words = words[1:]
    return parsers, words


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_the_docs_name_some_commands() -> None:
    assert len([s for doc in DOCS for s in _spans(doc.read_text())]) >= 20


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_ponyctl_command_in_the_docs_names_real_verbs_and_flags(doc: Path) -> None:
    parser = build_parser()
    wrong = []
    for span in _spans(doc.read_text()):
        words = span.split()[1:]
        parsers, rest = _resolve(parser, words)
        if _subparsers(parsers[0]) and rest and not rest[0].startswith(("-", "<", "[")):
            wrong.append(f"{span!r}: no verb {rest[0]!r}")
            continue
        for target in parsers:
            flags = {w.strip("[]").split("=")[0] for w in rest if w.strip("[").startswith("--")}
            unknown = sorted(f for f in flags if f not in _option_strings(target))
            if unknown:
                wrong.append(f"{span!r}: {target.prog} has no {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def test_the_command_lines_of_code_blocks_parse_as_written() -> None:
    lines = [code for doc in DOCS for code in _code_lines(doc.read_text()) if "[" not in code]
    assert lines
    parser = build_parser()
    for code in lines:
        try:
            args = parser.parse_args(shlex.split(code)[1:])
        except SystemExit:
            pytest.fail(f"the docs' command line does not parse: {code}")
        assert callable(args.func), code


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_repository_path_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text()
    named = [w for span in re.findall(r"`([^`\n]+)`", text) for w in span.split()]
    paths = [p.rstrip(".,:;") for p in named if p.startswith(ROOTED) and not re.search(r"[<>*…]|\.\.\.", p)]
    missing = [p for p in paths if not (ROOT / p).exists()]
    links = [
        link.split("#")[0]
        for link in re.findall(r"\]\(([^)\s]+)\)", text)
        if not link.startswith(("http://", "https://", "#", "mailto:"))
    ]
    missing += [link for link in links if link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_every_benchmark_command_in_the_docs_names_real_flags() -> None:
    commands = [m for doc in DOCS for m in re.findall(r"(bench/[a-z_]+\.py)([^`|\n]*)", doc.read_text())]
    assert commands
    wrong = []
    for script, rest in commands:
        source = (ROOT / script).read_text()
        wrong += [f"{script} {flag}" for flag in re.findall(r"--[a-z][a-z-]*", rest) if f'"{flag}"' not in source]
    assert not wrong, f"the docs name benchmark flags that do not exist: {wrong}"
