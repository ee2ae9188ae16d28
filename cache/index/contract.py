"""The index's contracts: what a build reads from it and what it writes (Protocols).

Three classes answer a build:

- :class:`cache.index.records.Index`: the SQLAlchemy index itself (every command, ``watch``);
- :class:`cache.index.buildindex.BuildIndex`: a one-shot build's view: stdlib reads plus its
  own pending writes, every write sent to the writer child;
- :class:`cache.index.reader.FastIndex`: the stdlib read-only path (reads only).

The first two are :class:`StepIndex`es, all three :class:`IndexReader`s; the build is typed
against these Protocols, not the classes.  Records are immutable once written: a second
``put_step`` of a key keeps the first record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cache.index.buildindex import BuildIndex
    from cache.index.reader import FastIndex
    from cache.index.records import BuildRecord, Index, Site, StatEntry, StepRecord, TagRecord
    from cache.types import BlobInfo, Digest, StepKey


class StatReader(Protocol):
    """Stat rows: (path, size, mtime_ns, ctime_ns, inode, mode) -> blake3 of the file."""

    def stat_get_many(self, paths: Iterable[str]) -> dict[str, StatEntry]: ...
    def stat_under(self, root: str) -> dict[str, StatEntry]: ...


class IndexReader(StatReader, Protocol):
    """What a build reads: step records, compressed forms of layers, tags, stat rows."""

    def get_step(self, key: StepKey) -> StepRecord | None: ...
    def get_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str
    ) -> BlobInfo | None: ...
    def get_tag(self, name: str) -> TagRecord | None: ...


class StepIndex(IndexReader, Protocol):
    """What a build reads and writes.  ``close`` commits (or hands over) every write."""

    def put_step(self, rec: StepRecord) -> bool: ...
    def touch_steps(
        self, keys: Sequence[StepKey], now: float, *, sites: Sequence[Site] | None = None
    ) -> None: ...
    def put_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str, blob: BlobInfo
    ) -> None: ...
    def set_tag(
        self,
        name: str,
        manifest_digest: Digest,
        meta_json: str,
        *,
        blobs: Iterable[Digest] = (),
        now: float | None = None,
    ) -> None: ...
    def stat_put_many(self, entries: Iterable[StatEntry]) -> None: ...
    def add_build(self, rec: BuildRecord) -> int | None: ...
    def close(self) -> None: ...


if TYPE_CHECKING:  # mypy proves the three implementations keep to the contracts

    def _implementations(
        index: Index, build: BuildIndex, fast: FastIndex
    ) -> tuple[StepIndex, StepIndex, IndexReader]:
        return index, build, fast
