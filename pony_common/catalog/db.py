"""Catalog engine and sessions, Alembic upgrade/downgrade under a database lock, opening errors as one line, the
dialect-portable upsert for idempotent (bulk) writes, and a counter of the statements a block of code runs."""

from __future__ import annotations

import fcntl
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, String, any_, bindparam, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from pony_common.config import ConfigError
from pony_common.errors import DependencyUnavailable

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")

# Every opener of a PostgreSQL catalog migrates holding this session advisory lock (advisory locks are per database),
# so services starting together on an empty database run the migrations once, one after the other.
MIGRATION_LOCK_KEY = 0x706F6E795F636174  # "pony_cat"
# A SQLite catalog's openers take an exclusive flock on this file beside it for the same purpose.
SQLITE_LOCK_SUFFIX = ".migrate.lock"

_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}


def engine_url(url: str) -> str:
    """The URL the catalog connects with: `postgres://` and `postgresql://` get the psycopg driver; a relative SQLite
    path is refused (the catalog cannot know which folder it is relative to: settings resolve it under state_dir)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"PONY_DATABASE_URL: {url!r} is not a database URL; use postgresql://… or sqlite:////abs/path"
        )
    scheme = _DRIVERS.get(scheme, scheme)
    if scheme.split("+")[0] == "sqlite":
        try:
            path = _sqlite_path(f"{scheme}://{rest}")
        except ArgumentError as exc:
            raise ConfigError(f"PONY_DATABASE_URL: {masked_url(url)} is not a database URL ({exc})") from None
        if path is not None and not path.is_absolute():
            raise ConfigError(
                f"PONY_DATABASE_URL: the SQLite path {str(path)!r} is relative; "
                f"use an absolute one, e.g. sqlite:///{path.absolute()}"
            )
    return f"{scheme}://{rest}"


def masked_url(url: str) -> str:
    """`url` with its password, if any, shown as ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", url)


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or a `file:` URI."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and foreign keys so workers and services can share it."""
    url = engine_url(url)
    try:
        if url.startswith("sqlite"):
            path = _sqlite_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            return engine
        return create_engine(url, pool_pre_ping=True, **kwargs)
    except (ArgumentError, ImportError) as exc:  # an unknown dialect, or a driver that is not installed
        raise ConfigError(
            f"PONY_DATABASE_URL: cannot use {masked_url(url)} ({exc}); use postgresql://… or sqlite:////abs/path"
        ) from None
    except OSError as exc:
        raise _unavailable(url, exc) from None


def _unavailable(url: str, exc: BaseException) -> DependencyUnavailable:
    """The one-line error of a catalog database that cannot be opened: what failed, where, and what to check."""
    raw = str(getattr(exc, "orig", None) or exc).strip()
    first = raw.splitlines()[0] if raw else type(exc).__name__
    reason = re.sub(r"^(FATAL|ERROR):\s+", "", first.rsplit("failed: ", 1)[-1].strip())
    lowered = reason.lower()
    if url.startswith("sqlite"):
        fix = "check PONY_DATABASE_URL (or PONY_STATE_DIR) and that its folder is writable"
    elif "authentication" in lowered or ("role" in lowered and "does not exist" in lowered):
        fix = "check the user and password in PONY_DATABASE_URL"
    elif "database" in lowered and "does not exist" in lowered:
        fix = "create the database or check PONY_DATABASE_URL"
    else:
        fix = "is PostgreSQL running? check PONY_DATABASE_URL"
    message = f"catalog database {masked_url(url)} unavailable: {reason}; {fix}"
    return DependencyUnavailable(" ".join(message.split()))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the opener before us has migrated
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A connection to the catalog at `url` held under its migration lock (PostgreSQL: a session advisory lock;
    SQLite: an flock on the file beside the database), so concurrent openers migrate one after the other.
    A database that cannot be reached raises DependencyUnavailable with a one-line message."""
    url = engine_url(url)
    path = _sqlite_path(url) if url.startswith("sqlite") else None
    with ExitStack() as stack:
        try:
            if path is not None:
                stack.enter_context(_file_lock(path.with_name(path.name + SQLITE_LOCK_SUFFIX)))
            # NullPool: closing the connection ends the database session, and with it any advisory lock it holds.
            engine = make_engine(url, poolclass=NullPool)
            stack.callback(engine.dispose)
            conn = stack.enter_context(engine.connect())
        except (OSError, DBAPIError) as exc:
            raise _unavailable(url, exc) from None
        postgres = conn.dialect.name == "postgresql"
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()
        yield conn
        if conn.in_transaction():
            conn.commit()
        if postgres:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            conn.commit()


def alembic_config(url: str) -> Config:
    """The Alembic configuration of the catalog's migrations (Alembic is imported only when a migration runs: its
    import logs at INFO, which the CLI must not show)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine_url(url).replace("%", "%%"))
    return cfg


def _quiet_alembic() -> None:
    """Alembic reports every step at INFO; the platform shows it only when the log level is DEBUG."""
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    logging.getLogger("alembic").setLevel(logging.NOTSET if debug else logging.WARNING)


def _migrate(url: str, action: str, revision: str) -> None:
    _quiet_alembic()  # before alembic is first imported
    from alembic import command

    with migration_connection(url) as conn:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def upgrade(url: str, revision: str = "head") -> None:
    """Migrates the catalog at `url` up to `revision`, under the migration lock."""
    _migrate(url, "upgrade", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrates the catalog at `url` down to `revision`, under the migration lock."""
    _migrate(url, "downgrade", revision)


class Catalog:
    """The catalog database: `with catalog.session() as s:` commits on success, rolls back on error.

    Opening it migrates it (unless `migrate=False`); a database that cannot be reached raises DependencyUnavailable,
    an unusable URL ConfigError, each with a one-line message."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        if migrate:
            upgrade(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def dispose(self) -> None:
        self.engine.dispose()


def insert_for(session: Session, model: type) -> Any:
    """The dialect's INSERT of `model` (PostgreSQL or SQLite): it has ON CONFLICT and RETURNING."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model)


def id_in(session: Session, column: Any, ids: Sequence[str]) -> Any:
    """`column = ANY(:ids)` with one array parameter on PostgreSQL (the statement text is the same whatever the batch
    size: cached and parsed once), `column IN (...)` elsewhere."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=postgresql.ARRAY(String)))
    return column.in_(list(ids))


def bulk_upsert(
    session: Session,
    model: type,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str] | None = None,
    *,
    set_: dict[str, Any] | None = None,
    where: Any = None,
    returning: Any = None,
) -> list[Any]:
    """INSERT … ON CONFLICT (keys) DO UPDATE SET `set_` (default: `update`, default every other column given, from
    the row offered) [WHERE `where`]
    [RETURNING `returning`] of many rows as ONE statement: the Core insert sent as an executemany, which SQLAlchemy's
    insertmanyvalues renders as a single multi-row VALUES per 1000 rows from a compiled form it caches (no per-row
    compiling as with `.values(rows)`). Returns the RETURNING values (empty without `returning`)."""
    if not rows:
        return []
    table = model.__table__  # type: ignore[attr-defined]
    stmt = insert_for(session, table)
    cols = [c for c in (list(rows[0]) if update is None else list(update)) if c not in keys]
    if set_ is None:
        set_ = {c: stmt.excluded[c] for c in cols}
    if set_:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=set_, where=where)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    # RETURNING (the first key when the caller wants nothing back) is what makes SQLAlchemy send the executemany as
    # one multi-row statement (insertmanyvalues) rather than one execution per row; it needs every bound value to be
    # in the VALUES rows, so `set_` and `where` should only use `excluded` columns and literals.
    back = list(session.execute(stmt.returning(table.c[keys[0]] if returning is None else returning), list(rows)))
    return [] if returning is None else [r[0] for r in back]


def upsert(
    session: Session,
    model: type,
    values: dict[str, Any] | Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str] | None = None,
) -> None:
    """INSERT … ON CONFLICT (keys) DO UPDATE (or DO NOTHING when `update` is empty): one idempotent write."""
    rows = [values] if isinstance(values, dict) else list(values)
    if not rows:
        return
    stmt = insert_for(session, model).values(rows)
    cols = list(rows[0]) if update is None else list(update)
    cols = [c for c in cols if c not in keys]
    if cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    session.execute(stmt)


class StatementCount:
    """Statements the engine ran inside `count_statements` (an executemany counts once: one round trip)."""

    def __init__(self) -> None:
        self.statements = 0
        self.by_verb: dict[str, int] = {}

    def add(self, statement: str) -> None:
        self.statements += 1
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        self.by_verb[verb] = self.by_verb.get(verb, 0) + 1


@contextmanager
def count_statements(engine: Engine, *, this_thread: bool = False) -> Iterator[StatementCount]:
    """Counts the SQL statements `engine` sends while the block runs (SQLAlchemy `before_cursor_execute`); with
    `this_thread`, only those this thread sends (not those of services sharing the engine in the process)."""
    count = StatementCount()
    mine = threading.get_ident()

    def listener(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not this_thread or threading.get_ident() == mine:
            count.add(statement)

    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield count
    finally:
        event.remove(engine, "before_cursor_execute", listener)


_catalogs: dict[str, Catalog] = {}
_catalogs_lock = threading.Lock()  # services loading in parallel threads share one Catalog per URL


def catalog_for(url: str) -> Catalog:
    """One migrated Catalog per database URL per process (workers and services share it)."""
    with _catalogs_lock:
        if url not in _catalogs:
            _catalogs[url] = Catalog(url)
        return _catalogs[url]
