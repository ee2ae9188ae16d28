"""The cache index: step records, compressed-layer records, tags, builds, stat rows, GC plans.

Vocabulary:

- a *step record* says what the step with a given key produced: its layer (``diff_id``, the
  uncompressed tar's blob), the layer's TOC (``toc_digest``, a JSON blob in the content store),
  the config change, and the canonical inputs behind the key (for ``lbuild why``);
- a *site* is where in a Dockerfile a step sits (Dockerfile id, stage, instruction index):
  "the same step" across builds, whatever its key;
- a blob is *referenced* when a step record or a tag needs it; garbage collection never
  removes a referenced blob.

Lifecycle: ``Index.open(url_or_path)`` creates or migrates the schema; every method runs in
its own transaction (writes take the write lock up front and retry while another process
holds it); ``close()`` releases the connections.  A step record is written only after its
blobs are committed to the content store, so a crash leaves a whole record or none.

The values (records, sites, tags, stat rows, prune plans) live in :mod:`cache.index.values` and
are re-exported here; they import nothing heavy, so :mod:`cache.index.reader` can return them
without loading SQLAlchemy.  The prune planning is :mod:`cache.index.gc`.  ``Index`` imports
SQLAlchemy and the models when opened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from cache.errors import StoreError
from cache.index.db import WRITE_OPTION, ensure_schema, make_engine, retry_locked, to_url
from cache.index.gc import plan_prune, referenced
from cache.index.values import (
    BuildRecord,
    PrunedStep,
    PrunePlan,
    Site,
    StatEntry,
    StepRecord,
    TagRecord,
)
from cache.types import BlobInfo, Digest, StepKey

__all__ = [
    "BuildRecord",
    "Index",
    "PrunePlan",
    "PrunedStep",
    "Site",
    "StatEntry",
    "StepRecord",
    "TagRecord",
    "prefix_range",
]

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from cache.index.models import Base, StepRow

T = TypeVar("T")

CHUNK = 500
"""Most values bound in one ``IN (...)`` list (SQLite caps bound parameters per statement)."""


def _chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _step_from_row(row: StepRow) -> StepRecord:
    return StepRecord(
        key=StepKey(row.key),
        diff_id=Digest(row.diff_id) if row.diff_id is not None else None,
        layer_size=row.layer_size,
        toc_digest=Digest(row.toc_digest) if row.toc_digest is not None else None,
        config_delta=row.config_delta,
        inputs=row.inputs,
        dockerfile_id=row.dockerfile_id,
        stage=row.stage,
        position=row.position,
        created=row.created,
        last_used=row.last_used,
        hits=row.hits,
        build_seconds=row.build_seconds,
    )


class Index:
    """The cache index over one database (SQLite file or SQLAlchemy URL).

    Safe to use from several processes at once (each opens its own ``Index``); one instance
    is not meant to be shared between threads.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine whose schema is current; use ``Index.open``."""
        self._engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self.url = url

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, url_or_path: str | os.PathLike[str]) -> Index:
        """Open the index, creating or migrating its schema (see :mod:`cache.index.db`)."""
        url = to_url(url_or_path)
        engine = make_engine(url)
        try:
            retry_locked(lambda: ensure_schema(engine), what=f"opening {url}")
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url)

    def close(self) -> None:
        """Release every connection (the database stays as it is)."""
        self._engine.dispose()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, what: str, fn: Callable[[Session], T]) -> T:
        from sqlalchemy.orm import Session

        def run() -> T:
            with Session(self._engine) as s, s.begin():
                return fn(s)

        return retry_locked(run, what=what)

    def _write(self, what: str, fn: Callable[[Session], T]) -> T:
        from sqlalchemy.orm import Session

        def run() -> T:
            with Session(self._write_engine) as s, s.begin():
                return fn(s)

        return retry_locked(run, what=what)

    def _insert(self, model: type[Base]) -> Any:
        """An INSERT with ON CONFLICT support for this database's dialect."""
        name = self._engine.dialect.name
        if name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(model)
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(model)
        raise StoreError(f"cache index: unsupported database {name!r} (use SQLite or PostgreSQL)")

    # -- step records ------------------------------------------------------------------

    def get_step(self, key: StepKey) -> StepRecord | None:
        """The record for ``key``, or None."""
        from cache.index.models import StepRow

        def run(s: Session) -> StepRecord | None:
            row = s.get(StepRow, key)
            return _step_from_row(row) if row is not None else None

        return self._read("reading a step record", run)

    def get_steps(self, keys: Iterable[StepKey]) -> dict[StepKey, StepRecord]:
        """The records that exist among ``keys`` (bulk form of ``get_step``)."""
        from sqlalchemy import select

        from cache.index.models import StepRow

        wanted = sorted(set(keys))

        def run(s: Session) -> dict[StepKey, StepRecord]:
            out: dict[StepKey, StepRecord] = {}
            for chunk in _chunks(wanted):
                for row in s.scalars(select(StepRow).where(StepRow.key.in_(chunk))):
                    out[StepKey(row.key)] = _step_from_row(row)
            return out

        return self._read("reading step records", run)

    def put_step(self, rec: StepRecord) -> bool:
        """Store ``rec`` in one transaction; True if stored, False if the key already had one.

        Putting the same key twice, from one process or two at once, is fine: the first
        record stays (records of one key are interchangeable by construction) and the site
        is remembered either way.
        """
        from cache.index.models import StepRow

        values = {
            "key": rec.key,
            "diff_id": rec.diff_id,
            "layer_size": rec.layer_size,
            "toc_digest": rec.toc_digest,
            "config_delta": rec.config_delta,
            "inputs": rec.inputs,
            "dockerfile_id": rec.dockerfile_id,
            "stage": rec.stage,
            "position": rec.position,
            "created": rec.created,
            "last_used": rec.last_used,
            "hits": rec.hits,
            "build_seconds": rec.build_seconds,
        }

        def run(s: Session) -> bool:
            stmt = (
                self._insert(StepRow)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["key"])
            )
            inserted = bool(s.execute(stmt).rowcount)  # type: ignore[attr-defined]
            self._note_sites(s, [(rec.key, rec.site)], rec.last_used)
            return inserted

        return self._write("storing a step record", run)

    def _note_sites(self, s: Session, uses: Sequence[tuple[StepKey, Site]], now: float) -> None:
        from cache.index.models import StepSiteRow

        if not uses:
            return
        rows = [
            {
                "dockerfile_id": site.dockerfile_id,
                "stage": site.stage,
                "position": site.position,
                "key": key,
                "last_used": now,
            }
            for key, site in dict.fromkeys(uses)
        ]
        for chunk in _chunks(rows, 200):
            stmt = self._insert(StepSiteRow).values(list(chunk))
            stmt = stmt.on_conflict_do_update(
                index_elements=["dockerfile_id", "stage", "position", "key"],
                set_={"last_used": stmt.excluded.last_used},
            )
            s.execute(stmt)

    def touch_steps(
        self,
        keys: Sequence[StepKey],
        now: float,
        *,
        sites: Sequence[Site] | None = None,
    ) -> None:
        """Mark cache hits: ``last_used = now``, ``hits + 1``, all in one transaction.

        ``sites``, parallel to ``keys`` when given, records where each hit was used, so
        ``last_record_at`` finds a step that was first built in another Dockerfile.
        Unknown keys are ignored.
        """
        from sqlalchemy import select, update

        from cache.index.models import StepRow

        if sites is not None and len(sites) != len(keys):
            raise ValueError("touch_steps: sites must be parallel to keys")
        unique = sorted(set(keys))
        if not unique:
            return

        def run(s: Session) -> None:
            for chunk in _chunks(unique):
                s.execute(
                    update(StepRow)
                    .where(StepRow.key.in_(chunk))
                    .values(last_used=now, hits=StepRow.hits + 1)
                    .execution_options(synchronize_session=False)
                )
            if sites is not None:
                existing: set[str] = set()
                for chunk in _chunks(unique):
                    existing.update(s.scalars(select(StepRow.key).where(StepRow.key.in_(chunk))))
                uses = [(k, site) for k, site in zip(keys, sites, strict=True) if k in existing]
                self._note_sites(s, uses, now)

        self._write("marking step records used", run)

    def last_record_at(self, dockerfile_id: str, stage: str, position: int) -> StepRecord | None:
        """The record most recently used at this site (what ``lbuild why`` compares to)."""
        from sqlalchemy import select

        from cache.index.models import StepRow, StepSiteRow

        def run(s: Session) -> StepRecord | None:
            row = s.scalars(
                select(StepRow)
                .join(StepSiteRow, StepSiteRow.key == StepRow.key)
                .where(
                    StepSiteRow.dockerfile_id == dockerfile_id,
                    StepSiteRow.stage == stage,
                    StepSiteRow.position == position,
                )
                .order_by(StepSiteRow.last_used.desc(), StepRow.created.desc(), StepRow.key)
                .limit(1)
            ).first()
            return _step_from_row(row) if row is not None else None

        return self._read("finding the last record of a step", run)

    def list_steps(
        self, *, limit: int | None = None, oldest_first: bool = True
    ) -> list[StepRecord]:
        """Step records ordered by last use (least recent first unless ``oldest_first=False``)."""
        from sqlalchemy import select

        from cache.index.models import StepRow

        def run(s: Session) -> list[StepRecord]:
            if oldest_first:
                order = (StepRow.last_used.asc(), StepRow.created.asc(), StepRow.key.asc())
            else:
                order = (StepRow.last_used.desc(), StepRow.created.desc(), StepRow.key.desc())
            q = select(StepRow).order_by(*order)
            if limit is not None:
                q = q.limit(limit)
            return [_step_from_row(r) for r in s.scalars(q)]

        return self._read("listing step records", run)

    def delete_steps(self, keys: Iterable[StepKey]) -> int:
        """Delete these step records (and their sites); return how many existed."""
        wanted = sorted(set(keys))
        return self._write("deleting step records", lambda s: self._delete_steps(s, wanted))

    def _delete_steps(self, s: Session, keys: Sequence[StepKey]) -> int:
        from sqlalchemy import delete

        from cache.index.models import StepRow, StepSiteRow

        n = 0
        for chunk in _chunks(keys):
            # explicit, not only ON DELETE CASCADE: a shared server may run without FK enforcement
            s.execute(delete(StepSiteRow).where(StepSiteRow.key.in_(chunk)))
            n += s.execute(delete(StepRow).where(StepRow.key.in_(chunk))).rowcount  # type: ignore[attr-defined]
        return n

    # -- compressed layers -------------------------------------------------------------

    def put_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str, blob: BlobInfo
    ) -> None:
        """Remember that compressing ``diff_id`` this way gave ``blob`` (first writer wins)."""
        from cache.index.models import CompressedRow

        def run(s: Session) -> None:
            stmt = self._insert(CompressedRow).values(
                diff_id=diff_id,
                codec=codec,
                level=level,
                codec_version=codec_version,
                digest=blob.digest,
                size=blob.size,
                media_type=blob.media_type,
            )
            s.execute(stmt.on_conflict_do_nothing())

        self._write("storing a compressed layer", run)

    def get_compressed(
        self, diff_id: Digest, codec: str, level: int, codec_version: str
    ) -> BlobInfo | None:
        """The blob compressing ``diff_id`` with this codec, level and codec version gave."""
        from cache.index.models import CompressedRow

        def run(s: Session) -> BlobInfo | None:
            row = s.get(CompressedRow, (diff_id, codec, level, codec_version))
            if row is None:
                return None
            return BlobInfo(Digest(row.digest), row.size, row.media_type)

        return self._read("reading a compressed layer", run)

    # -- tags --------------------------------------------------------------------------

    def set_tag(
        self,
        name: str,
        manifest_digest: Digest,
        meta_json: str,
        *,
        blobs: Iterable[Digest] = (),
        now: float | None = None,
    ) -> None:
        """Point ``name`` at an image; ``blobs`` (config and layers) are kept while it does."""
        from sqlalchemy import delete

        from cache.index.models import TagBlobRow, TagRow

        when = time.time() if now is None else now
        pinned = sorted(set(blobs))

        def run(s: Session) -> None:
            stmt = self._insert(TagRow).values(
                name=name, manifest_digest=manifest_digest, meta_json=meta_json, updated=when
            )
            s.execute(
                stmt.on_conflict_do_update(
                    index_elements=["name"],
                    set_={
                        "manifest_digest": stmt.excluded.manifest_digest,
                        "meta_json": stmt.excluded.meta_json,
                        "updated": stmt.excluded.updated,
                    },
                )
            )
            s.execute(delete(TagBlobRow).where(TagBlobRow.tag == name))
            for chunk in _chunks(pinned):
                s.execute(
                    self._insert(TagBlobRow).values([{"tag": name, "digest": d} for d in chunk])
                )

        self._write("setting a tag", run)

    def get_tag(self, name: str) -> TagRecord | None:
        """The image ``name`` points at, or None."""
        tags = self._read("reading a tag", lambda s: self._tags(s, name))
        return tags[0] if tags else None

    def list_tags(self) -> list[TagRecord]:
        """Every tag, sorted by name."""
        return self._read("listing tags", lambda s: self._tags(s, None))

    def delete_tag(self, name: str) -> bool:
        """Remove a tag (its blobs become collectable); True if it existed."""
        from sqlalchemy import delete

        from cache.index.models import TagBlobRow, TagRow

        def run(s: Session) -> bool:
            s.execute(delete(TagBlobRow).where(TagBlobRow.tag == name))
            return bool(s.execute(delete(TagRow).where(TagRow.name == name)).rowcount)  # type: ignore[attr-defined]

        return self._write("deleting a tag", run)

    def _tags(self, s: Session, name: str | None) -> list[TagRecord]:
        from sqlalchemy import select

        from cache.index.models import TagBlobRow, TagRow

        q = select(TagRow).order_by(TagRow.name)
        bq = select(TagBlobRow.tag, TagBlobRow.digest).order_by(TagBlobRow.tag, TagBlobRow.digest)
        if name is not None:
            q = q.where(TagRow.name == name)
            bq = bq.where(TagBlobRow.tag == name)
        blobs: dict[str, list[Digest]] = {}
        for tag, digest in s.execute(bq):
            blobs.setdefault(tag, []).append(Digest(digest))
        return [
            TagRecord(
                name=row.name,
                manifest_digest=Digest(row.manifest_digest),
                meta_json=row.meta_json,
                updated=row.updated,
                blobs=tuple(blobs.get(row.name, ())),
            )
            for row in s.scalars(q)
        ]

    # -- builds ------------------------------------------------------------------------

    def add_build(self, rec: BuildRecord) -> int:
        """Record a finished build; return its id."""
        from cache.index.models import BuildRow

        def run(s: Session) -> int:
            row = BuildRow(
                started=rec.started,
                target=rec.target,
                manifest_digest=rec.manifest_digest,
                seconds=rec.seconds,
                steps_hit=rec.steps_hit,
                steps_missed=rec.steps_missed,
            )
            s.add(row)
            s.flush()
            return row.id

        return self._write("recording a build", run)

    def list_builds(self, *, limit: int | None = None) -> list[BuildRecord]:
        """Builds, most recent first."""
        from sqlalchemy import select

        from cache.index.models import BuildRow

        def run(s: Session) -> list[BuildRecord]:
            q = select(BuildRow).order_by(BuildRow.started.desc(), BuildRow.id.desc())
            if limit is not None:
                q = q.limit(limit)
            return [
                BuildRecord(
                    started=r.started,
                    target=r.target,
                    manifest_digest=Digest(r.manifest_digest) if r.manifest_digest else None,
                    seconds=r.seconds,
                    steps_hit=r.steps_hit,
                    steps_missed=r.steps_missed,
                    id=r.id,
                )
                for r in s.scalars(q)
            ]

        return self._read("listing builds", run)

    # -- garbage collection ------------------------------------------------------------

    def referenced_blobs(self) -> set[Digest]:
        """Every blob a step record or a tag needs: layers, TOCs, their compressed forms,
        tagged manifests and the blobs tags pin."""
        return self._read("listing referenced blobs", referenced)

    def prune_plan(
        self,
        *,
        keep_bytes: int | None,
        keep_duration_s: float | None,
        now: float,
        blob_sizes: Mapping[Digest, int],
    ) -> PrunePlan:
        """Plan a garbage collection; nothing is removed (``apply_prune`` does that).

        ``blob_sizes`` lists the blobs in the content store.  Records unused for longer than
        ``keep_duration_s`` go; then, while the blobs still needed weigh more than
        ``keep_bytes``, the least recently used records go.  A blob goes when no remaining
        record and no tag needs it; tagged images are never pruned, even over the byte cap.
        """
        return self._read(
            "planning a prune",
            lambda s: plan_prune(s, keep_bytes, keep_duration_s, now, blob_sizes),
        )

    def apply_prune(self, plan: PrunePlan) -> tuple[Digest, ...]:
        """Delete the plan's records and return the blobs that may now be deleted from disk.

        Runs in one transaction and re-checks references inside it: a blob a record or tag
        committed since the plan was made is left out of the answer.  Delete the returned
        blobs after this returns (a crash in between only leaves unreferenced blobs, which
        the next prune finds).
        """
        from sqlalchemy import delete

        from cache.index.models import CompressedRow

        def run(s: Session) -> tuple[Digest, ...]:
            self._delete_steps(s, sorted(plan.step_keys))
            still = referenced(s)
            gone = tuple(d for d in plan.blobs if d not in still)
            for chunk in _chunks(gone):
                s.execute(delete(CompressedRow).where(CompressedRow.digest.in_(chunk)))
            return gone

        return self._write("pruning", run)

    # -- stat index rows (used by cache.index.statindex) -------------------------------------

    def stat_get_many(self, paths: Iterable[str]) -> dict[str, StatEntry]:
        """Stat rows for these absolute paths (missing paths are absent from the answer)."""

        from cache.index.models import StatRow

        wanted = sorted(set(paths))

        def run(s: Session) -> dict[str, StatEntry]:
            out: dict[str, StatEntry] = {}
            for chunk in _chunks(wanted):
                for r in s.execute(_stat_columns().where(StatRow.path.in_(chunk))):
                    out[r.path] = _stat_from_row(r)
            return out

        return self._read("reading the stat index", run)

    def stat_under(self, root: str) -> dict[str, StatEntry]:
        """Every stat row for a path below the absolute directory ``root``."""

        from cache.index.models import StatRow

        low, high = prefix_range(root)

        def run(s: Session) -> dict[str, StatEntry]:
            # Plain rows, not ORM objects: a context of thousands of files is loaded at once.
            q = _stat_columns().where(StatRow.path >= low, StatRow.path < high)
            return {r.path: _stat_from_row(r) for r in s.execute(q)}

        return self._read("reading the stat index", run)

    def stat_put_many(self, entries: Iterable[StatEntry]) -> None:
        """Insert or replace stat rows, in one transaction."""
        from cache.index.models import StatRow

        rows = [
            {
                "path": e.path,
                "size": e.size,
                "mtime_ns": e.mtime_ns,
                "ctime_ns": e.ctime_ns,
                "inode": e.inode,
                "mode": e.mode,
                "blake3": e.blake3,
            }
            for e in {e.path: e for e in entries}.values()
        ]
        if not rows:
            return

        def run(s: Session) -> None:
            # One statement executed with many parameter sets (the DBAPI's executemany): an
            # order of magnitude faster than multi-row VALUES statements compiled per chunk.
            stmt = self._insert(StatRow)
            stmt = stmt.on_conflict_do_update(
                index_elements=["path"],
                set_={
                    c: getattr(stmt.excluded, c)
                    for c in ("size", "mtime_ns", "ctime_ns", "inode", "mode", "blake3")
                },
            )
            s.execute(stmt, rows)

        self._write("writing the stat index", run)

def prefix_range(root: str) -> tuple[str, str]:
    """``(low, high)`` such that ``low <= p < high`` exactly for paths ``p`` below ``root``."""
    prefix = root.rstrip("/") + "/"
    # '0' is the character after '/': every "prefix..." string sorts below prefix[:-1] + "0"
    return prefix, prefix[:-1] + "0"


def _stat_columns() -> Any:
    """SELECT of the stat index's columns (rows as tuples, no ORM identity map)."""
    from sqlalchemy import select

    from cache.index.models import StatRow

    return select(
        StatRow.path,
        StatRow.size,
        StatRow.mtime_ns,
        StatRow.ctime_ns,
        StatRow.inode,
        StatRow.mode,
        StatRow.blake3,
    )


def _stat_from_row(r: Any) -> StatEntry:
    return StatEntry(r.path, r.size, r.mtime_ns, r.ctime_ns, r.inode, r.mode, r.blake3)
