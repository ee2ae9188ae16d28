"""The cache index for commands that must change nothing (``lbuild plan``, ``lbuild why``).

Reads go through the stdlib read path (:class:`cache.index.reader.FastIndex`); every write a
build would make (stat rows, records, tags) is dropped.  Opening must not change the home
either, and a plain read-only SQLite connection does: on a WAL database it creates (and leaves)
``lbuild.db-wal`` and ``lbuild.db-shm`` and writes its read marks into the latter.  So:

- no database: an empty index (every step is a miss);
- a database of another schema version, or a file that is not one: ``StoreError`` (migrating
  or repairing it is a build's job, and an empty answer would be a wrong one);
- no ``lbuild.db-wal`` (or an empty one): the file is opened ``immutable``, which takes no
  locks and creates no files.  Everything committed is in the main file; a build that starts
  writing meanwhile can make a read fail, which is then reported as a ``StoreError``;
- a non-empty ``lbuild.db-wal`` (a build is writing, or the last one left its log): the
  database and its log are copied into ``scratch`` (a private directory outside the home) and
  the copy is opened, so SQLite replays the log there.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path

from cache.errors import StoreError
from cache.index.db import BUSY_TIMEOUT_S, SCHEMA_VERSION
from cache.index.reader import FastIndex
from cache.index.values import BuildRecord, Site, StatEntry, StepRecord, TagRecord
from cache.types import BlobInfo, Digest, StepKey

_NOT_A_DB = "not a database"


def _connect(path: Path, query: str) -> FastIndex | str:
    """The reader, or why there is none: ``_NOT_A_DB`` or the schema version found."""
    try:
        conn = sqlite3.connect(
            path.as_uri() + query,
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error:
        return _NOT_A_DB
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error:
        conn.close()
        return _NOT_A_DB
    if row is None or row[0] != str(SCHEMA_VERSION):
        conn.close()
        return f"schema version {row[0] if row is not None else 'unknown'}"
    return FastIndex(conn, path)


def open_reader(db: Path, scratch: Path) -> FastIndex | None:
    """A reader of ``db`` that changes no file next to it (see the module doc); None when
    there is no database."""
    if not db.is_file():
        return None
    found = _open_reader(db, scratch)
    if isinstance(found, FastIndex):
        return found
    if found == _NOT_A_DB:
        raise StoreError(
            f"cannot read the cache index {db}: it is not a database",
            hint="run `lbuild cache verify --repair`",
        )
    version = found.rsplit(" ", 1)[-1]
    older = version.isdigit() and int(version) < SCHEMA_VERSION
    raise StoreError(
        f"cannot read the cache index {db} without changing it: it has {found},"
        f" this lbuild reads {SCHEMA_VERSION}",
        hint="run `lbuild build` to migrate it, then this again"
        if older
        else "it was written by another lbuild version",
    )


def _open_reader(db: Path, scratch: Path) -> FastIndex | str:
    wal = db.with_name(db.name + "-wal")
    try:
        logged = wal.stat().st_size > 0
    except FileNotFoundError:
        logged = False
    if not logged:
        return _connect(db, "?mode=ro&immutable=1")
    copy = scratch / db.name
    try:
        shutil.copyfile(db, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
    except FileNotFoundError:  # the log was checkpointed away meanwhile: all is in db now
        return _connect(db, "?mode=ro&immutable=1")
    except OSError as e:
        raise StoreError(f"cannot read the cache index {db}: {e.strerror or e}") from None
    return _connect(copy, "")


class ReadOnlyIndex:
    """A :class:`cache.index.contract.StepIndex` that reads ``fast`` (nothing when None) and
    drops every write."""

    def __init__(self, fast: FastIndex | None) -> None:
        self._fast = fast

    def _guard(self, what: str, e: sqlite3.Error) -> StoreError:
        return StoreError(f"cannot read the cache index ({what}): {e}; run the command again")

    # -- reads -------------------------------------------------------------------------

    def get_step(self, key: StepKey) -> StepRecord | None:
        try:
            return self._fast.get_step(key) if self._fast is not None else None
        except sqlite3.Error as e:
            raise self._guard("a step record", e) from None

    def get_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str
    ) -> BlobInfo | None:
        if self._fast is None:
            return None
        try:
            return self._fast.get_compressed(diff_id, codec, level, codec_version)
        except sqlite3.Error as e:
            raise self._guard("a compressed layer", e) from None

    def get_tag(self, name: str) -> TagRecord | None:
        try:
            return self._fast.get_tag(name) if self._fast is not None else None
        except sqlite3.Error as e:
            raise self._guard("a tag", e) from None

    def stat_get_many(self, paths: Iterable[str]) -> dict[str, StatEntry]:
        try:
            return self._fast.stat_get_many(paths) if self._fast is not None else {}
        except sqlite3.Error as e:
            raise self._guard("the stat index", e) from None

    def stat_under(self, root: str) -> dict[str, StatEntry]:
        try:
            return self._fast.stat_under(root) if self._fast is not None else {}
        except sqlite3.Error as e:
            raise self._guard("the stat index", e) from None

    def last_record_at(self, dockerfile_id: str, stage: str, position: int) -> StepRecord | None:
        """The record most recently used at this site (``Index.last_record_at``'s answer)."""
        if self._fast is None:
            return None
        try:
            return self._fast.last_record_at(dockerfile_id, stage, position)
        except sqlite3.Error as e:
            raise self._guard("the last record of a step", e) from None

    # -- writes: dropped ---------------------------------------------------------------

    def put_step(self, rec: StepRecord) -> bool:
        return False

    def touch_steps(
        self, keys: Sequence[StepKey], now: float, *, sites: Sequence[Site] | None = None
    ) -> None:
        return None

    def put_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str, blob: BlobInfo
    ) -> None:
        return None

    def set_tag(
        self,
        name: str,
        manifest_digest: Digest,
        meta_json: str,
        *,
        blobs: Iterable[Digest] = (),
        now: float | None = None,
    ) -> None:
        return None

    def stat_put_many(self, entries: Iterable[StatEntry]) -> None:
        return None

    def add_build(self, rec: BuildRecord) -> int | None:
        return None

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
