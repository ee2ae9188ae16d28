"""Database setup for the cache index: where it lives, engines, schema version and migrations.

The index is SQLite in WAL mode at ``$LBUILD_HOME/lbuild.db`` by default; any SQLAlchemy URL
with the same schema works (PostgreSQL for a shared index).  The ``meta`` table holds
``schema_version``.  Opening a database:

- with no tables creates the current schema;
- at an older version runs the migrations from that version up, in one transaction;
- at a newer version fails with ``StoreError`` (this lbuild does not know that layout).

SQLAlchemy is imported inside functions only: :mod:`cache.index.reader` imports this module for
``SCHEMA_VERSION`` and ``sqlite_file`` and must stay free of SQLAlchemy.

Version history:

- 1: ``meta``, ``steps`` (no ``toc_digest``), ``compressed``, ``tags``, ``tag_blobs``,
  ``builds``, ``stat_index`` (no ``ctime_ns``).
- 2: ``steps.toc_digest`` (the layer's TOC as a JSON blob), ``stat_index.ctime_ns`` (catches
  rewrites that restore mtime), table ``step_sites`` (where each key was used, for why).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cache.errors import StoreError

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

T = TypeVar("T")

SCHEMA_VERSION = 2
"""The layout this lbuild reads and writes."""

WRITE_OPTION = "lbuild_write"
"""Execution option: a transaction that will write.  On SQLite it starts with ``BEGIN
IMMEDIATE`` so the write lock is taken up front; a deferred transaction that reads and then
writes fails at once with "database is locked" when another writer got in between (no busy
wait can help it, because its snapshot is stale)."""

BUSY_TIMEOUT_S = 30.0
"""How long a connection waits on another process's lock before giving up."""

SQLITE_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
    # NORMAL is safe in WAL: a power cut may lose the last commits, never corrupt
    "PRAGMA synchronous = NORMAL",
)
"""What every writing connection to a SQLite index sets, after its ``busy_timeout``
(``make_engine``'s connections and :mod:`cache.index.writer`'s)."""


def sqlite_file(url_or_path: str | os.PathLike[str]) -> Path | None:
    """The SQLite file a path or URL names, or None for another database or in-memory SQLite."""
    text = os.fspath(url_or_path)
    if "://" not in text:
        return Path(os.path.abspath(text))
    scheme, _, rest = text.partition("://")
    if scheme.split("+", 1)[0] != "sqlite":
        return None
    # sqlite:///relative, sqlite:////absolute; the part after the last '/' of '//' is the path
    path = rest[1:] if rest.startswith("/") else rest
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(os.path.abspath(path))


def to_url(url_or_path: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL for a path (an SQLite file) or an URL (returned unchanged)."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    return "sqlite:///" + os.path.abspath(text)


REPAIR_HINT = "run `lbuild cache verify --repair`"
"""What to do about a damaged index (``cache/index/repair.py``)."""

_DAMAGE_WORDS = ("malformed", "not a database", "disk image", "corrupt")


def is_damage(e: BaseException) -> bool:
    """Whether a database error means the file itself is damaged (not locked, not missing)."""
    text = str(getattr(e, "orig", None) or e).lower()
    return any(w in text for w in _DAMAGE_WORDS)


def is_locked_error(exc: BaseException) -> bool:
    """Whether a database error means "another process holds the lock; try again"."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def make_engine(
    url_or_path: str | os.PathLike[str], *, busy_timeout_s: float = BUSY_TIMEOUT_S
) -> Engine:
    """An engine for the index; for SQLite: WAL, busy timeout, foreign keys, explicit BEGIN."""
    from sqlalchemy import create_engine, event

    url = to_url(url_or_path)
    path = sqlite_file(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create cache directory {path.parent}: {e.strerror}") from e
    engine = create_engine(url)
    if engine.dialect.name != "sqlite":
        return engine

    busy_ms = int(busy_timeout_s * 1000)

    def on_connect(dbapi_connection: object, _record: object) -> None:
        # sqlite3's legacy transaction control starts no transaction for SELECT or DDL:
        # turn it off and emit BEGIN ourselves (the recipe from SQLAlchemy's SQLite docs).
        dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
        cur = dbapi_connection.cursor()  # type: ignore[attr-defined]
        try:
            # busy_timeout first: switching to WAL takes a lock another process may hold
            cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
            for pragma in SQLITE_PRAGMAS:
                cur.execute(pragma)
        finally:
            cur.close()

    def on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    return engine


@dataclass(frozen=True)
class Migration:
    """One step of the schema: brings a database from ``from_version`` to ``from_version + 1``.

    Migrations use literal DDL, not the models: a model describes the newest layout, and a
    migration must keep working after the models change again.
    """

    from_version: int
    description: str
    apply: Callable[[Connection], None]


def _migrate_1_to_2(conn: Connection) -> None:
    conn.exec_driver_sql("ALTER TABLE steps ADD COLUMN toc_digest VARCHAR(71)")
    # -1 never equals a real ctime, so every old stat row misses once and is re-hashed
    conn.exec_driver_sql("ALTER TABLE stat_index ADD COLUMN ctime_ns BIGINT NOT NULL DEFAULT -1")
    conn.exec_driver_sql(
        "CREATE TABLE step_sites ("
        " dockerfile_id TEXT NOT NULL,"
        " stage TEXT NOT NULL,"
        " position INTEGER NOT NULL,"
        " key VARCHAR(64) NOT NULL REFERENCES steps (key) ON DELETE CASCADE,"
        " last_used FLOAT NOT NULL,"
        " PRIMARY KEY (dockerfile_id, stage, position, key))"
    )
    conn.exec_driver_sql("CREATE INDEX ix_step_sites_key ON step_sites (key)")
    # every existing record was made at its own site: seed the trail from it
    conn.exec_driver_sql(
        "INSERT INTO step_sites (dockerfile_id, stage, position, key, last_used)"
        " SELECT dockerfile_id, stage, position, key, last_used FROM steps"
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "TOC reference, stat ctime, step sites", _migrate_1_to_2),
)
"""Every migration, in order; the last one ends at ``SCHEMA_VERSION``."""


def _read_version(conn: Connection) -> int | None:
    from sqlalchemy import inspect, select

    from cache.index.models import MetaRow

    if not inspect(conn).has_table(MetaRow.__tablename__):
        return None
    value = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar()
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise StoreError(f"cache schema version {value!r} is not a number") from None


def _check_not_newer(version: int, current: int) -> None:
    if version > current:
        raise StoreError(
            f"cache schema version {version} is newer than this lbuild ({current}); "
            "upgrade lbuild or use another LBUILD_HOME"
        )


def ensure_schema(
    engine: Engine,
    *,
    current: int = SCHEMA_VERSION,
    migrations: tuple[Migration, ...] = MIGRATIONS,
) -> int:
    """Create or migrate the schema to ``current``; return the version found before.

    Reads first (no lock when the schema is already current), then, if work is needed,
    re-reads under the write lock so two processes opening a new cache at once create it
    once.  ``current`` and ``migrations`` are parameters only so tests can exercise the
    machinery; lbuild always uses the defaults.
    """
    from sqlalchemy import insert, update

    from cache.index.models import Base, MetaRow

    with engine.connect() as conn, conn.begin():
        found = _read_version(conn)
    if found is not None:
        _check_not_newer(found, current)
        if found == current:
            return found

    with engine.execution_options(**{WRITE_OPTION: True}).connect() as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            # serialise schema work between machines sharing one server ("lbuild" in hex)
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(1818387057)")
        found = _read_version(conn)
        if found is None:
            Base.metadata.create_all(conn)
            conn.execute(insert(MetaRow).values(key="schema_version", value=str(current)))
            return 0
        _check_not_newer(found, current)
        version = found
        by_start = {m.from_version: m for m in migrations}
        while version < current:
            step = by_start.get(version)
            if step is None:
                raise StoreError(f"no migration from cache schema version {version}")
            step.apply(conn)
            version += 1
        if version != found:
            conn.execute(
                update(MetaRow).where(MetaRow.key == "schema_version").values(value=str(version))
            )
        return found


def retry_locked(fn: Callable[[], T], *, what: str, timeout_s: float = BUSY_TIMEOUT_S) -> T:
    """Run ``fn`` again while it fails with "database is locked", up to ``timeout_s``.

    The busy timeout already waits inside SQLite; this covers the cases it does not (a lock
    held across WAL recovery or a checkpoint, a stale read snapshot).  Any other database
    error becomes a ``StoreError`` naming ``what`` was being done.
    """
    from sqlalchemy.exc import OperationalError, SQLAlchemyError

    return retry_while_locked(
        fn, what=what, operational=OperationalError, error=SQLAlchemyError, timeout_s=timeout_s
    )


def retry_while_locked(
    fn: Callable[[], T],
    *,
    what: str,
    operational: type[Exception],
    error: type[Exception],
    timeout_s: float = BUSY_TIMEOUT_S,
) -> T:
    """``retry_locked`` for any database API: ``operational`` is its class of errors that
    "database is locked" belongs to, ``error`` the class of all its database errors."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return fn()
        except operational as e:
            if not is_locked_error(e) or time.monotonic() + delay > deadline:
                raise StoreError(f"cache index: {what}: {_short(e)}") from e
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        except error as e:
            hint = REPAIR_HINT if is_damage(e) else None
            raise StoreError(f"cache index: {what}: {_short(e)}", hint=hint) from e


def _short(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return str(orig if orig is not None else e).splitlines()[0]
