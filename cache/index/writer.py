"""The index writer child's writes through the stdlib ``sqlite3`` module.

A build's index writes are done by a child process (:mod:`cache.index.recorder`) so that the
build never waits for them; that child imported SQLAlchemy, the ORM and the models to make
them: about 0.2 CPU-seconds per build, spent on the second of this machine's two cores while
the build's own threads (layer writing, compression, the RUN's snapshot) needed it.  The six
writes a build makes (:data:`cache.index.recorder.WRITE_METHODS`) are simple upserts, so
``FastWriter`` makes them with hand-written SQL over the same SQLite file, as
:mod:`cache.index.reader` does for the hot reads; each method does exactly what the
``Index`` method of the same name does, in one ``BEGIN IMMEDIATE`` transaction retried
while another process holds the lock (``tests/test_index_writer.py`` applies the same
random calls through both and compares every row of every table).

``FastWriter.open`` returns None unless the index is a SQLite file with the current schema
version (``create=True`` makes a missing one first, whole: see ``_make_new``); the child then
opens ``Index`` (which migrates or refuses the database with a proper error).  Reads, GC,
repair and every other database stay with ``Index``.  This module must not import SQLAlchemy (a test checks ``sys.modules``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from cache.errors import StoreError
from cache.index.db import (
    BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    SQLITE_PRAGMAS,
    retry_while_locked,
    sqlite_file,
)
from cache.index.reader import FastIndex, marks
from cache.index.records import CHUNK, BuildRecord, Site, StatEntry, StepRecord
from cache.types import BlobInfo, Digest, StepKey

T = TypeVar("T")

# The tables and indexes ``Index.open`` creates in a new SQLite index (SQLAlchemy's DDL for
# cache.index.models at SCHEMA_VERSION, whitespace collapsed); tests/test_index_writer.py
# compares a database made with these with one made by ``Index.open``, statement by statement.
_SCHEMA = (
    (
        'CREATE TABLE meta ( "key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY '
        '("key") )'
    ),
    (
        'CREATE TABLE steps ( "key" VARCHAR(64) NOT NULL, diff_id VARCHAR(71), layer_size '
        'BIGINT NOT NULL, toc_digest VARCHAR(71), config_delta TEXT NOT NULL, inputs TEXT '
        'NOT NULL, dockerfile_id TEXT NOT NULL, stage TEXT NOT NULL, position INTEGER NOT '
        'NULL, created FLOAT NOT NULL, last_used FLOAT NOT NULL, hits INTEGER NOT NULL, '
        'build_seconds FLOAT NOT NULL, PRIMARY KEY ("key") )'
    ),
    'CREATE INDEX ix_steps_last_used ON steps (last_used)',
    'CREATE INDEX ix_steps_diff_id ON steps (diff_id)',
    (
        'CREATE TABLE compressed ( diff_id VARCHAR(71) NOT NULL, codec VARCHAR(16) NOT '
        'NULL, level INTEGER NOT NULL, codec_version VARCHAR(64) NOT NULL, digest '
        'VARCHAR(71) NOT NULL, size BIGINT NOT NULL, media_type TEXT NOT NULL, PRIMARY '
        'KEY (diff_id, codec, level, codec_version) )'
    ),
    'CREATE INDEX ix_compressed_digest ON compressed (digest)',
    (
        'CREATE TABLE tags ( name TEXT NOT NULL, manifest_digest VARCHAR(71) NOT NULL, '
        'meta_json TEXT NOT NULL, updated FLOAT NOT NULL, PRIMARY KEY (name) )'
    ),
    (
        'CREATE TABLE builds ( id INTEGER NOT NULL, started FLOAT NOT NULL, target TEXT '
        'NOT NULL, manifest_digest VARCHAR(71), seconds FLOAT NOT NULL, steps_hit INTEGER '
        'NOT NULL, steps_missed INTEGER NOT NULL, PRIMARY KEY (id) )'
    ),
    'CREATE INDEX ix_builds_started ON builds (started)',
    (
        'CREATE TABLE stat_index ( path TEXT NOT NULL, size BIGINT NOT NULL, mtime_ns '
        'BIGINT NOT NULL, ctime_ns BIGINT NOT NULL, inode BIGINT NOT NULL, mode INTEGER '
        'NOT NULL, blake3 VARCHAR(64) NOT NULL, PRIMARY KEY (path) )'
    ),
    (
        'CREATE TABLE step_sites ( dockerfile_id TEXT NOT NULL, stage TEXT NOT NULL, '
        'position INTEGER NOT NULL, "key" VARCHAR(64) NOT NULL, last_used FLOAT NOT NULL, '
        'PRIMARY KEY (dockerfile_id, stage, position, "key"), FOREIGN KEY("key") '
        'REFERENCES steps ("key") ON DELETE CASCADE )'
    ),
    'CREATE INDEX ix_step_sites_key ON step_sites ("key")',
    (
        'CREATE TABLE tag_blobs ( tag TEXT NOT NULL, digest VARCHAR(71) NOT NULL, PRIMARY '
        'KEY (tag, digest), FOREIGN KEY(tag) REFERENCES tags (name) ON DELETE CASCADE )'
    ),
)

_SITE_UPSERT = (
    "INSERT INTO step_sites (dockerfile_id, stage, position, key, last_used)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (dockerfile_id, stage, position, key)"
    " DO UPDATE SET last_used = excluded.last_used"
)


class FastWriter:
    """The writes of ``Index`` a build makes, without SQLAlchemy (see the module docstring).
    One instance per process; not for several threads at once."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an open connection; use ``FastWriter.open``."""
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str], *, create: bool = False) -> FastWriter | None:
        """Open the index for writing, or None when this path does not apply.  ``create``:
        a missing (or empty) SQLite file is made with the current schema first."""
        path = sqlite_file(url_or_path)
        if path is None or not (create or path.is_file()):
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if create and not path.exists():
                _make_new(path)
            conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error):
            return None
        try:
            # the connection settings of cache.index.db.make_engine
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if create and not conn.execute("SELECT 1 FROM sqlite_master").fetchone():
                conn.execute("PRAGMA journal_mode = WAL")
                cls(conn, path)._write("creating the cache index", _create)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None or row[0] != str(SCHEMA_VERSION):
                conn.close()
                return None
            for pragma in SQLITE_PRAGMAS:
                conn.execute(pragma)
        except (sqlite3.Error, StoreError):
            conn.close()
            return None
        return cls(conn, path)

    def close(self) -> None:
        """Checkpoint the WAL into the database and close.  The writer child is usually the
        last to close, but the build's own read-only connection can still be open then, and
        a read-only connection never checkpoints: the whole index (a new home's schema and
        rows) was left in ``lbuild.db-wal``, moved into ``lbuild.db`` by whichever
        connection closed next (``cache du`` measured one layout and left the other).  The
        checkpoint truncates the WAL when no reader is in its way, waiting 0.1 s at most."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA busy_timeout = 100")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one ``BEGIN IMMEDIATE`` transaction, retried while the database is locked
        (``cache.index.db.retry_locked``'s policy); another error is a ``StoreError``."""

        def once() -> T:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return out

        return retry_while_locked(
            once, what=what, operational=sqlite3.OperationalError, error=sqlite3.Error
        )

    # -- the writes (each as ``cache.index.records.Index``'s) ---------------------------

    def put_step(self, rec: StepRecord) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "INSERT INTO steps (key, diff_id, layer_size, toc_digest, config_delta, inputs,"
                " dockerfile_id, stage, position, created, last_used, hits, build_seconds)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                (rec.key, rec.diff_id, rec.layer_size, rec.toc_digest, rec.config_delta,
                 rec.inputs, rec.dockerfile_id, rec.stage, rec.position, rec.created,
                 rec.last_used, rec.hits, rec.build_seconds),
            )  # fmt: skip
            inserted = cur.rowcount > 0
            _note_sites(c, [(rec.key, rec.site)], rec.last_used)
            return inserted

        return self._write("storing a step record", run)

    def touch_steps(
        self, keys: Sequence[StepKey], now: float, *, sites: Sequence[Site] | None = None
    ) -> None:
        if sites is not None and len(sites) != len(keys):
            raise ValueError("touch_steps: sites must be parallel to keys")
        unique = sorted(set(keys))
        if not unique:
            return

        def run(c: sqlite3.Connection) -> None:
            for i in range(0, len(unique), CHUNK):
                chunk = unique[i : i + CHUNK]
                c.execute(
                    f"UPDATE steps SET last_used = ?, hits = hits + 1"
                    f" WHERE key IN ({marks(len(chunk))})",
                    (now, *chunk),
                )
            if sites is not None:
                existing = FastIndex(c, self.path).has_steps(unique)  # this transaction's view
                uses = [(k, s) for k, s in zip(keys, sites, strict=True) if k in existing]
                _note_sites(c, uses, now)

        self._write("marking step records used", run)

    def put_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str, blob: BlobInfo
    ) -> None:
        self._write(
            "storing a compressed layer",
            lambda c: c.execute(
                "INSERT INTO compressed (diff_id, codec, level, codec_version, digest, size,"
                " media_type) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (diff_id, codec, level, codec_version, blob.digest, blob.size, blob.media_type),
            ),
        )

    def set_tag(
        self,
        name: str,
        manifest_digest: Digest,
        meta_json: str,
        *,
        blobs: Iterable[Digest] = (),
        now: float | None = None,
    ) -> None:
        when = time.time() if now is None else now
        pinned = sorted(set(blobs))

        def run(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO tags (name, manifest_digest, meta_json, updated) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET manifest_digest = excluded.manifest_digest,"
                " meta_json = excluded.meta_json, updated = excluded.updated",
                (name, manifest_digest, meta_json, when),
            )
            c.execute("DELETE FROM tag_blobs WHERE tag = ?", (name,))
            c.executemany(
                "INSERT INTO tag_blobs (tag, digest) VALUES (?, ?)", [(name, d) for d in pinned]
            )

        self._write("setting a tag", run)

    def add_build(self, rec: BuildRecord) -> int:
        def run(c: sqlite3.Connection) -> int:
            cur = c.execute(
                "INSERT INTO builds (started, target, manifest_digest, seconds, steps_hit,"
                " steps_missed) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.started, rec.target, rec.manifest_digest, rec.seconds, rec.steps_hit,
                 rec.steps_missed),
            )  # fmt: skip
            assert cur.lastrowid is not None
            return cur.lastrowid

        return self._write("recording a build", run)

    def stat_put_many(self, entries: Iterable[StatEntry]) -> None:
        rows = [
            (e.path, e.size, e.mtime_ns, e.ctime_ns, e.inode, e.mode, e.blake3)
            for e in {e.path: e for e in entries}.values()
        ]
        if not rows:
            return
        self._write(
            "writing the stat index",
            lambda c: c.executemany(
                "INSERT INTO stat_index (path, size, mtime_ns, ctime_ns, inode, mode, blake3)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET"
                " size = excluded.size, mtime_ns = excluded.mtime_ns,"
                " ctime_ns = excluded.ctime_ns, inode = excluded.inode,"
                " mode = excluded.mode, blake3 = excluded.blake3",
                rows,
            ),
        )


def _make_new(path: Path) -> None:
    """Make a new index at ``path`` whole or not at all.  The schema is written into a private
    file beside it, which is then linked into place: no other process ever opens the index
    with its tables half made (a build's read path, finding one, declined it and the build
    opened the index through SQLAlchemy, ~0.2 s).  Another process that linked its own first
    wins; ours is dropped."""
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{time.monotonic_ns()}")
    try:
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # kept in the file's header
            conn.execute("BEGIN IMMEDIATE")
            _create(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()  # the last connection: the WAL is checkpointed into the file
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _create(c: sqlite3.Connection) -> None:
    """``ensure_schema`` on an empty database, under the write lock: another process may have
    made it since we looked (then its schema, whatever its version, is left as it is)."""
    if c.execute("SELECT 1 FROM sqlite_master").fetchone():
        return
    for statement in _SCHEMA:
        c.execute(statement)
    c.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _note_sites(c: sqlite3.Connection, uses: Sequence[tuple[StepKey, Site]], now: float) -> None:
    """``Index._note_sites``: where each key was used, ``last_used = now``."""
    c.executemany(
        _SITE_UPSERT,
        [(s.dockerfile_id, s.stage, s.position, k, now) for k, s in dict.fromkeys(uses)],
    )
