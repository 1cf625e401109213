"""The safety service's catalog tables: the character codex, `codex_versions` (one row per import) and
`codex_characters` (the current characters), and `CodexStore`, their reads and writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text, delete, func, select
from sqlalchemy.orm import Mapped, mapped_column

from pony_common.catalog.db import Catalog, upsert
from pony_common.catalog.models import TS, Base, utcnow
from services.safety.codex import Codex, CodexCharacter, check_unique


class CodexVersionRow(Base):
    __tablename__ = "codex_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(TS, default=utcnow)


class CodexCharacterRow(Base):
    """A character in the codex; `key` is the normalised name (lower case, single spaces, underscores as spaces)."""

    __tablename__ = "codex_characters"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    aliases: Mapped[list[Any]] = mapped_column(JSON, default=list)
    franchise: Mapped[str] = mapped_column(String(255), default="")
    # adult | minor | ambiguous
    age_class: Mapped[str] = mapped_column(String(16))
    real_person: Mapped[bool] = mapped_column(Boolean, default=False)
    version: Mapped[int] = mapped_column(Integer, default=1)


def _character(row: CodexCharacterRow) -> CodexCharacter:
    return CodexCharacter(row.name, tuple(row.aliases or ()), row.franchise, row.age_class, row.real_person)


class CodexStore:
    """The codex tables of one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def latest_version(self) -> int:
        """The current codex version (0 when nothing was ever imported)."""
        with self.catalog.session() as s:
            return int(s.scalar(select(func.max(CodexVersionRow.version))) or 0)

    def load(self) -> Codex:
        with self.catalog.session() as s:
            version = int(s.scalar(select(func.max(CodexVersionRow.version))) or 0)
            rows = s.scalars(select(CodexCharacterRow).order_by(CodexCharacterRow.key)).all()
            characters = tuple(_character(r) for r in rows)
        return Codex(version, characters)

    def import_characters(
        self, characters: Sequence[CodexCharacter], note: str = "", merge: bool = False
    ) -> tuple[int, bool]:
        """Makes `characters` the codex (with `merge`, adds/updates them and keeps the rest) as a new version.

        Returns (version, changed); an import that changes nothing keeps the current version.
        """
        check_unique(characters, "import")
        with self.catalog.session() as s:
            current = int(s.scalar(select(func.max(CodexVersionRow.version))) or 0)
            existing = {r.key: _character(r) for r in s.scalars(select(CodexCharacterRow)).all()}
            incoming = {c.key: c for c in characters}
            target = {**existing, **incoming} if merge else incoming
            if target == existing and current > 0:
                return current, False
            check_unique(list(target.values()), "codex after merge" if merge else "import")
            version = current + 1
            s.add(CodexVersionRow(version=version, note=note))
            removed = [key for key in existing if key not in target]
            if removed:
                s.execute(delete(CodexCharacterRow).where(CodexCharacterRow.key.in_(removed)))
            changed = [c for key, c in target.items() if existing.get(key) != c]
            upsert(
                s,
                CodexCharacterRow,
                [{"key": c.key, **c.to_dict(), "aliases": list(c.aliases), "version": version} for c in changed],
                keys=["key"],
            )
            return version, True
