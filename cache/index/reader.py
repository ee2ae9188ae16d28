"""A read-only view of the SQLite cache index through the stdlib ``sqlite3`` module.

A no-op rebuild must finish in well under 0.3 s, and importing SQLAlchemy alone costs about
0.2 s.  The hot reads of that path (stat rows in bulk, step records by key, a tag) are
therefore served here with hand-written SQL over the same database file that
:class:`cache.index.records.Index` manages; everything else, and every write, goes through
``Index``.  The SQL must follow the column names in :mod:`cache.index.models`; a test checks
that both answer the same.

``FastIndex.open`` returns None whenever the fast path cannot be trusted — the index is not
a SQLite file, the file does not exist yet, or its schema version is not the one this code
was written for — and the caller then opens ``Index`` instead (which creates, migrates or
refuses the database with a proper error).

This module must not import SQLAlchemy (a test checks ``sys.modules``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cache.index.db import BUSY_TIMEOUT_S, SCHEMA_VERSION, sqlite_file
from cache.index.records import CHUNK, StatEntry, StepRecord, TagRecord, prefix_range
from cache.types import BlobInfo, Digest, StepKey

_STEP_COLUMNS = (
    "key, diff_id, layer_size, toc_digest, config_delta, inputs, dockerfile_id, stage,"
    " position, created, last_used, hits, build_seconds"
)
_STAT_COLUMNS = "path, size, mtime_ns, ctime_ns, inode, mode, blake3"


def _step(row: Sequence[Any]) -> StepRecord:
    return StepRecord(
        key=StepKey(row[0]),
        diff_id=Digest(row[1]) if row[1] is not None else None,
        layer_size=row[2],
        toc_digest=Digest(row[3]) if row[3] is not None else None,
        config_delta=row[4],
        inputs=row[5],
        dockerfile_id=row[6],
        stage=row[7],
        position=row[8],
        created=row[9],
        last_used=row[10],
        hits=row[11],
        build_seconds=row[12],
    )


def _stat(row: Sequence[Any]) -> StatEntry:
    return StatEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6])


def marks(n: int) -> str:
    """``n`` SQL parameter placeholders (``?,?,...``)."""
    return ",".join("?" * n)


class FastIndex:
    """Read-only access to the hot tables of a SQLite cache index, without SQLAlchemy.

    Each query sees the committed state at the moment it runs (WAL readers never block and
    are never blocked by writers).  Not for use from several threads at once.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an open read-only connection; use ``FastIndex.open``."""
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str]) -> FastIndex | None:
        """Open the index read-only, or None when the fast path does not apply (see module doc)."""
        path = sqlite_file(url_or_path)
        if path is None or not path.is_file():
            return None
        try:
            conn = sqlite3.connect(
                path.as_uri() + "?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error:
            # not a database, or no schema yet: Index.open will say what is wrong
            conn.close()
            return None
        if row is None or row[0] != str(SCHEMA_VERSION):
            conn.close()
            return None
        return cls(conn, path)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> FastIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- step records ------------------------------------------------------------------

    def get_step(self, key: StepKey) -> StepRecord | None:
        """The record for ``key``, or None (same answer as ``Index.get_step``)."""
        row = self._conn.execute(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE key = ?", (key,)
        ).fetchone()
        return _step(row) if row is not None else None

    def get_steps(self, keys: Iterable[StepKey]) -> dict[StepKey, StepRecord]:
        """The records that exist among ``keys``."""
        wanted = sorted(set(keys))
        out: dict[StepKey, StepRecord] = {}
        for i in range(0, len(wanted), CHUNK):
            chunk = wanted[i : i + CHUNK]
            for row in self._conn.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE key IN ({marks(len(chunk))})", chunk
            ):
                rec = _step(row)
                out[rec.key] = rec
        return out

    def has_steps(self, keys: Iterable[StepKey]) -> set[StepKey]:
        """Which of ``keys`` have a record (cheaper than ``get_steps``: no JSON text)."""
        wanted = sorted(set(keys))
        out: set[StepKey] = set()
        for i in range(0, len(wanted), CHUNK):
            chunk = wanted[i : i + CHUNK]
            out.update(
                StepKey(r[0])
                for r in self._conn.execute(
                    f"SELECT key FROM steps WHERE key IN ({marks(len(chunk))})", chunk
                )
            )
        return out

    def last_record_at(self, dockerfile_id: str, stage: str, position: int) -> StepRecord | None:
        """The record most recently used at this site (same answer as ``Index.last_record_at``)."""
        cols = ", ".join(f"steps.{c.strip()}" for c in _STEP_COLUMNS.split(","))
        row = self._conn.execute(
            f"SELECT {cols} FROM steps JOIN step_sites ON step_sites.key = steps.key"
            " WHERE step_sites.dockerfile_id = ? AND step_sites.stage = ?"
            " AND step_sites.position = ?"
            " ORDER BY step_sites.last_used DESC, steps.created DESC, steps.key LIMIT 1",
            (dockerfile_id, stage, position),
        ).fetchone()
        return _step(row) if row is not None else None

    # -- compressed layers -------------------------------------------------------------

    def get_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str
    ) -> BlobInfo | None:
        """The blob compressing ``diff_id`` this way gave (same answer as ``Index``'s)."""
        row = self._conn.execute(
            "SELECT digest, size, media_type FROM compressed"
            " WHERE diff_id = ? AND codec = ? AND level = ? AND codec_version = ?",
            (diff_id, codec, level, codec_version),
        ).fetchone()
        return BlobInfo(Digest(row[0]), row[1], row[2]) if row is not None else None

    # -- tags --------------------------------------------------------------------------

    def get_tag(self, name: str) -> TagRecord | None:
        """The image ``name`` points at, or None (same answer as ``Index.get_tag``)."""
        row = self._conn.execute(
            "SELECT name, manifest_digest, meta_json, updated FROM tags WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            return None
        blobs = tuple(
            Digest(r[0])
            for r in self._conn.execute(
                "SELECT digest FROM tag_blobs WHERE tag = ? ORDER BY digest", (name,)
            )
        )
        return TagRecord(row[0], Digest(row[1]), row[2], row[3], blobs)

    # -- stat index --------------------------------------------------------------------

    def stat_get_many(self, paths: Iterable[str]) -> dict[str, StatEntry]:
        """Stat rows for these absolute paths (missing paths are absent)."""
        wanted = sorted(set(paths))
        out: dict[str, StatEntry] = {}
        for i in range(0, len(wanted), CHUNK):
            chunk = wanted[i : i + CHUNK]
            for row in self._conn.execute(
                f"SELECT {_STAT_COLUMNS} FROM stat_index WHERE path IN ({marks(len(chunk))})",
                chunk,
            ):
                out[row[0]] = _stat(row)
        return out

    def stat_under(self, root: str) -> dict[str, StatEntry]:
        """Every stat row for a path below the absolute directory ``root`` (one range scan)."""
        low, high = prefix_range(root)
        return {
            row[0]: _stat(row)
            for row in self._conn.execute(
                f"SELECT {_STAT_COLUMNS} FROM stat_index WHERE path >= ? AND path < ?",
                (low, high),
            )
        }
