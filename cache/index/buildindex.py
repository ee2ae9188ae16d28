"""The cache index as one build uses it, without SQLAlchemy in the building process.

A build reads a few hot things (step records by key, compressed forms of layers, a tag, stat
rows) and writes records as steps finish.  :class:`BuildIndex` answers the reads with
:class:`cache.index.reader.FastIndex` (stdlib ``sqlite3``) plus this build's own writes, and
hands every write to a :class:`cache.index.recorder.Recorder` child, which applies it through
:class:`cache.index.records.Index` (SQLAlchemy) — so SQLAlchemy's import overlaps the build.

It has the same method names and answers as ``Index`` for what a build does; anything else
(``why``, ``cache ls|prune|verify``) opens ``Index`` itself.

When it applies (``BuildIndex.open`` returns None otherwise, and the caller opens ``Index``):
the index is a SQLite file that either does not exist yet (every read answers "nothing";
the child creates it) or has the schema version this code reads.  Any other state (an older
schema to migrate, a file that is not a database) needs ``Index.open``'s handling.

Consistency: a write is visible to this build's reads at once (the overlay), and to other
processes once the child commits it.  A read that misses a record another build is writing
at that moment only costs a rebuild; it never serves a wrong layer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cache.index.db import sqlite_file
from cache.index.reader import FastIndex
from cache.index.recorder import NothingApplied, Recorder, Writes
from cache.index.records import BuildRecord, Site, StatEntry, StepRecord, TagRecord
from cache.types import BlobInfo, Digest, StepKey

_CompressedKey = tuple[Digest, str, int, str]


class BuildIndex:
    """Reads from the stdlib read path and this build's writes; writes through a child.

    Thread-safe (the solver's workers look steps up concurrently).
    """

    def __init__(self, fast: FastIndex | None, recorder: Writes, db: Path) -> None:
        """Use ``BuildIndex.open``."""
        self._fast = fast
        self._recorder = recorder
        self._db = db
        # every write sent, in order: applied here if the child could apply none of them
        self._calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._steps: dict[StepKey, StepRecord] = {}
        self._compressed: dict[_CompressedKey, BlobInfo] = {}
        self._tags: dict[str, TagRecord] = {}

    @classmethod
    def open(
        cls,
        url_or_path: str | os.PathLike[str],
        *,
        keep_fds: Sequence[int] = (),
        recorder: Writes | None = None,
    ) -> BuildIndex | None:
        """A build index over the database, or None when it does not apply (see module doc).

        ``keep_fds`` are passed to the writer child (the build's lock on the cache home).
        ``recorder``: a writer already started for this database (it is abandoned when the
        build index does not apply).
        """
        path = sqlite_file(url_or_path)
        fast: FastIndex | None = None
        if path is not None and path.exists():
            fast = FastIndex.open(path)
        if path is None or (fast is None and path.exists()):
            if recorder is not None:
                recorder.abandon()
            return None
        if recorder is not None:
            return cls(fast, recorder, path)
        try:
            recorder = Recorder.start(path, keep_fds=keep_fds)
        except BaseException:
            if fast is not None:
                fast.close()
            raise
        return cls(fast, recorder, path)

    @property
    def path(self) -> Path | None:
        """The database file read (None before it exists)."""
        return self._fast.path if self._fast is not None else None

    def _send(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._calls.append((method, args, kwargs))
        self._recorder.call(method, *args, **kwargs)

    def sync(self) -> None:
        """Wait until every write so far is committed; raise ``StoreError`` if one failed."""
        self._recorder.sync()

    def close(self) -> None:
        """Commit every write and end the writer (raising if a write failed).

        When the child applied none of them (it could not start or open the index), they
        are applied here through ``Index`` instead, which reports what is wrong if it cannot
        either: a broken writer never costs a build its records.
        """
        try:
            try:
                self._recorder.close()
            except NothingApplied:
                from cache.index.records import Index

                with Index.open(self._db) as index:
                    for method, args, kwargs in self._calls:
                        getattr(index, method)(*args, **kwargs)
        finally:
            if self._fast is not None:
                self._fast.close()
                self._fast = None

    # -- step records ------------------------------------------------------------------

    def get_step(self, key: StepKey) -> StepRecord | None:
        """The record for ``key``, or None (as ``Index.get_step``)."""
        with self._lock:
            mine = self._steps.get(key)
            if mine is not None or self._fast is None:
                return mine
            return self._fast.get_step(key)

    def put_step(self, rec: StepRecord) -> bool:
        """Store ``rec`` (as ``Index.put_step``); True if this build had not stored the key yet.

        The database keeps the first record of a key, whoever wrote it; the child's answer
        is not waited for.
        """
        with self._lock:
            new = rec.key not in self._steps
            self._steps.setdefault(rec.key, rec)
            self._send("put_step", rec)
        return new

    def touch_steps(
        self, keys: Sequence[StepKey], now: float, *, sites: Sequence[Site] | None = None
    ) -> None:
        """Mark cache hits (as ``Index.touch_steps``)."""
        if sites is not None and len(sites) != len(keys):
            raise ValueError("touch_steps: sites must be parallel to keys")
        with self._lock:
            self._send(
                "touch_steps", list(keys), now, sites=list(sites) if sites is not None else None
            )

    # -- compressed layers -------------------------------------------------------------

    def get_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str
    ) -> BlobInfo | None:
        """The blob compressing ``diff_id`` this way gave (as ``Index.get_compressed``)."""
        with self._lock:
            mine = self._compressed.get((diff_id, codec, level, codec_version))
            if mine is not None or self._fast is None:
                return mine
            return self._fast.get_compressed(diff_id, codec, level, codec_version)

    def put_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str, blob: BlobInfo
    ) -> None:
        """Remember a compressed form (as ``Index.put_compressed``)."""
        with self._lock:
            self._compressed.setdefault((diff_id, codec, level, codec_version), blob)
            self._send("put_compressed", diff_id, codec, level, codec_version, blob)

    # -- tags --------------------------------------------------------------------------

    def get_tag(self, name: str) -> TagRecord | None:
        """The image ``name`` points at, or None (as ``Index.get_tag``)."""
        with self._lock:
            mine = self._tags.get(name)
            if mine is not None or self._fast is None:
                return mine
            return self._fast.get_tag(name)

    def set_tag(
        self,
        name: str,
        manifest_digest: Digest,
        meta_json: str,
        *,
        blobs: Iterable[Digest] = (),
        now: float | None = None,
    ) -> None:
        """Point ``name`` at an image (as ``Index.set_tag``)."""
        when = time.time() if now is None else now
        pinned = tuple(sorted(set(blobs)))
        with self._lock:
            self._tags[name] = TagRecord(name, manifest_digest, meta_json, when, pinned)
            self._send("set_tag", name, manifest_digest, meta_json, blobs=pinned, now=when)

    # -- builds ------------------------------------------------------------------------

    def add_build(self, rec: BuildRecord) -> None:
        """Record a finished build (as ``Index.add_build``; its id is the child's to assign)."""
        with self._lock:
            self._send("add_build", rec)

    # -- stat index --------------------------------------------------------------------

    def stat_get_many(self, paths: Iterable[str]) -> dict[str, StatEntry]:
        """Stat rows for these absolute paths (as ``Index.stat_get_many``)."""
        with self._lock:
            return self._fast.stat_get_many(paths) if self._fast is not None else {}

    def stat_under(self, root: str) -> dict[str, StatEntry]:
        """Every stat row below directory ``root`` (as ``Index.stat_under``)."""
        with self._lock:
            return self._fast.stat_under(root) if self._fast is not None else {}

    def stat_put_many(self, entries: Iterable[StatEntry]) -> None:
        """Insert or replace stat rows (as ``Index.stat_put_many``; the caller's
        ``StatIndex`` keeps its own copy, so they are not added to the overlay)."""
        rows = list(entries)
        if rows:
            with self._lock:
                self._send("stat_put_many", rows)
