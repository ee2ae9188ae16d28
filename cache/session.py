"""An opened cache home: its content store and its index, built at the edge and passed in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cache.errors import LbuildError
from cache.home import Home, ensure_home, home_dir, lock_home

if TYPE_CHECKING:
    from cache.index.contract import StepIndex
    from cache.index.recorder import Writes
    from cache.index.records import Index
    from cache.store.blobs import BlobStore


@dataclass
class Session:
    """An opened cache home: content store and index. Built at the edge, passed in.

    ``index`` is the full ``Index`` (SQLAlchemy), or for a build opened with
    ``deferred=True`` a ``BuildIndex`` (stdlib reads, writes in a child process; see
    :mod:`cache.index.buildindex`).  Commands that need more than a build's reads and writes use
    ``full_index``.
    """

    home: Path
    store: BlobStore
    index: StepIndex

    @property
    def full_index(self) -> Index:
        """The SQLAlchemy ``Index`` (only for sessions opened without ``deferred``)."""
        from cache.index.records import Index

        if not isinstance(self.index, Index):
            raise TypeError("this session's index is a build index; open it without deferred")
        return self.index

    @classmethod
    @contextmanager
    def open(
        cls,
        home: Path | None,
        *,
        exclusive: bool = False,
        deferred: bool = False,
        recorder: Writes | None = None,
    ) -> Iterator[Session]:
        """Open the cache home.

        Builds hold a shared lock for their whole run; prune and verify open with
        ``exclusive=True``, so they wait for running builds and keep new ones out (a blob
        is written before its record, and must not be collected in between).  With
        ``deferred``, index writes go to a child process that also holds that lock until its
        last write is committed; leaving the block waits for it and raises ``StoreError`` if
        a write failed (unless the block is already failing: then the writes that were sent
        are still committed, and the block's own error is the one raised).  ``recorder`` is
        a writer child started ahead (``cache.home.start_writer``), used or abandoned
        here.
        """
        from cache.store.blobs import BlobStore

        h = ensure_home(home_dir(home))
        with lock_home(h, exclusive=exclusive) as lock_fd:
            store = BlobStore(h)
            store.sweep_tmp()
            index: StepIndex | None = None
            if deferred:
                from cache.index.buildindex import BuildIndex

                index = BuildIndex.open(Home(h).db, keep_fds=(lock_fd,), recorder=recorder)
            elif recorder is not None:
                recorder.abandon()
            if index is None:
                from cache.index.records import Index

                index = Index.open(str(Home(h).db))
            try:
                yield cls(h, store, index)
            except BaseException:
                with suppress(LbuildError):
                    index.close()
                raise
            index.close()

    @classmethod
    @contextmanager
    def read_only(cls, home: Path | None) -> Iterator[Session]:
        """Open the cache home for a command that changes nothing in it (``plan``, ``why``).

        No file or directory under the home is created, written or removed, and a home that
        does not exist is not created (its index is then empty): the index is read without
        touching the database files, its writes are dropped, and blobs the command fetches
        (a base image's manifest, a ``--cache-from`` source's records) go to a private
        scratch directory removed on leaving (see :mod:`cache.index.readonly`,
        :mod:`cache.store.scratch`).  No lock is taken: a build running meanwhile may make a
        read fail (``StoreError``), never the home change.
        """
        import shutil
        import tempfile

        from cache.index.readonly import ReadOnlyIndex, open_reader
        from cache.store.scratch import ScratchStore

        h = Home(home_dir(home))
        scratch = Path(tempfile.mkdtemp(prefix="lbuild-readonly-"))
        try:
            index = ReadOnlyIndex(open_reader(h.db, scratch))
            try:
                yield cls(h.root, ScratchStore(scratch / "store", h.blobs), index)
            finally:
                index.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
