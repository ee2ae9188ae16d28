"""The solver's step cache over the index: lookups, records of built steps and of layers by
content, hits remembered and flushed in one transaction, compressed forms of layers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from builder.plan.keys import LAYER_OP
from cache.types import BlobInfo, Compression, Digest

if TYPE_CHECKING:
    from builder.plan.dag import Step
    from builder.solve.solver import CacheHit
    from cache.index.records import Site
    from cache.remote.artifact import Record
    from cache.remote.remote import RemoteCache
    from cache.session import Session
    from cache.store.contract import ContentStore
    from cache.types import LayerInfo, StepKey


def _layer_site() -> Site:
    from cache.index.records import Site

    return Site("", "", -1)


class IndexCache:
    """The solver's StepCache over the SQLAlchemy index."""

    def __init__(
        self, session: Session, dockerfile_id: str, remote: RemoteCache | None = None
    ) -> None:
        self.session = session
        self.dockerfile_id = dockerfile_id
        self.remote = remote
        self.touched: list[tuple[StepKey, Site]] = []
        self.sources: dict[StepKey, str] = {}
        self._lock = threading.Lock()
        self.imported: dict[StepKey, tuple[Record, Site]] = {}
        """Hits answered by a shared cache; filed in the local index at ``flush`` once their
        blobs are committed here (a record never precedes its blobs)."""

    def _hit(self, key: StepKey) -> CacheHit | None:
        from builder.solve.solver import CacheHit

        rec = self.session.index.get_step(key)
        if rec is None:
            return None
        if rec.diff_id is not None and not self.session.store.has(rec.diff_id):
            return None  # a record whose blob is gone is a miss, never served
        return CacheHit(rec.diff_id, rec.toc_digest, rec.layer_size)

    def _put(
        self,
        key: StepKey,
        layer: LayerInfo | None,
        toc_digest: Digest | None,
        inputs: str,
        site: Site,
        seconds: float,
    ) -> None:
        from cache.index.records import StepRecord

        now = time.time()
        self.session.index.put_step(
            StepRecord(
                key=key,
                diff_id=layer.diff_id if layer else None,
                layer_size=layer.size if layer else 0,
                toc_digest=toc_digest if layer else None,
                config_delta="{}",
                inputs=inputs,
                dockerfile_id=site.dockerfile_id,
                stage=site.stage,
                position=site.position,
                created=now,
                last_used=now,
                hits=0,
                build_seconds=seconds,
            )
        )

    def _site(self, step: Step) -> Site:
        from cache.index.records import Site

        return Site(self.dockerfile_id, str(step.stage), step.pos)

    def lookup(self, step: Step) -> CacheHit | None:
        """The local index first, then the ``--cache-from`` sources in order."""
        hit = self._hit(step.key)
        if hit is not None or self.remote is None:
            return hit
        rec = self.remote.lookup(step.key)
        if rec is None:
            return None
        store = self.session.store
        if rec.diff_id is not None and not (store.has(rec.diff_id) or self.remote.can_fetch(rec.diff_id)):
            return None
        from builder.solve.solver import CacheHit

        with self._lock:
            self.imported[step.key] = (rec, self._site(step))
            self.sources[step.key] = self.remote.source_of(step.key)
        return CacheHit(rec.diff_id, rec.toc.digest if rec.toc else None, rec.layer_size)

    def hit_source(self, key: StepKey) -> str:
        """Where a hit came from: "" for the local index, else the cache source."""
        return self.sources.get(key, "")

    def used(self, step: Step) -> None:
        """Remember a hit, to bump its last-used time and site after the build."""
        self.touched.append((step.key, self._site(step)))

    def record(
        self, step: Step, layer: LayerInfo | None, seconds: float, toc_digest: Digest | None
    ) -> None:
        # the canonical JSON the key was computed over (the planner's), else encoded here
        inputs = step.inputs_json.decode() if step.inputs_json else json.dumps(step.inputs, sort_keys=True)
        self._put(step.key, layer, toc_digest, inputs, self._site(step), seconds)

    def _file_imported(self) -> None:
        store = self.session.store
        with self._lock:
            pending = list(self.imported.values())
            self.imported.clear()
        for rec, site in pending:
            blobs = [rec.diff_id] if rec.diff_id is not None else []
            if rec.toc is not None:
                blobs.append(rec.toc.digest)
            if all(store.has(d) for d in blobs):
                import_record(self.session, rec, site)

    def layer_for(self, content_key: StepKey) -> CacheHit | None:
        """The layer written before from the same entries (a *layer record*: see
        ``Solver.write``), or None; never one whose blob is gone."""
        hit = self._hit(content_key)
        if hit is None or hit.diff_id is None:
            return None
        self.touched.append((content_key, _layer_site()))
        return hit

    def remember_layer(
        self, content_key: StepKey, layer: LayerInfo, toc_digest: Digest | None
    ) -> None:
        """Record a layer under its content key (a step record at no Dockerfile site)."""
        self._put(content_key, layer, toc_digest, json.dumps({"op": LAYER_OP}), _layer_site(), 0.0)

    def flush(self) -> None:
        """Write the hits of this build (last used, hit count, site) in one transaction, and
        file the shared cache's records whose blobs this build brought into the store."""
        self._file_imported()
        if self.touched:
            self.session.index.touch_steps(
                [k for k, _ in self.touched], time.time(), sites=[s for _, s in self.touched]
            )
            self.touched.clear()


class _Counted:
    """A blob opened for reading that reports the bytes read so far (``progress(done, total)``
    every 8 MiB and at the end): the byte counter of a long compression."""

    STEP = 8 << 20

    def __init__(self, f: Any, total: int, progress: Callable[[int, int], None]) -> None:
        self.f, self.total, self.progress = f, total, progress
        self.done = self.told = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self.f.read(n)
        self.done += len(data)
        if self.done - self.told >= self.STEP or (self.done == self.total != self.told):
            self.told = self.done
            self.progress(self.done, self.total)
        return data

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


METER_MIN_BYTES = 4 << 20  # smaller blobs move too fast for a counter to be seen


class MeteredStore:
    """The content store, with ``open`` of a blob of ``min_bytes`` or more counting the bytes
    read as ``progress(digest, done, total)`` (everything else as it is): the byte counter of
    a long compression or export."""

    def __init__(
        self,
        store: ContentStore,
        progress: Callable[[Digest, int, int], None],
        min_bytes: int = METER_MIN_BYTES,
    ) -> None:
        self._store, self._progress, self._min = store, progress, min_bytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def open(self, d: Digest) -> Any:
        size = self._store.size(d)
        f = self._store.open(d)
        if size < self._min:
            return f
        return _Counted(f, size, lambda done, total: self._progress(d, done, total))


def codec_params(codec: Compression) -> tuple[int, str]:
    """The level and codec version a layer is compressed with (part of a compressed form's
    identity in the index and in a shared cache's records)."""
    from cache.layers.tar import GZIP_DEFAULT_LEVEL, ZSTD_DEFAULT_LEVEL, codec_version

    level = {"gzip": GZIP_DEFAULT_LEVEL, "zstd": ZSTD_DEFAULT_LEVEL}.get(codec, 0)
    return level, codec_version(codec)


def compressed_blob(
    session: Session,
    diff_id: Digest,
    codec: Compression,
    remote: RemoteCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """The compressed blob of a layer, compressing only on a cache miss.  A shared cache's
    blob made the same way (codec, level, codec version) is taken as it is, fetched only
    when its bytes are needed.  ``progress(done, total)`` counts the bytes of a long
    compression (a layer of 4 MiB or more)."""
    from cache.layers.tar import compress_layer

    level, version = codec_params(codec)
    found = session.index.get_compressed(diff_id, codec, level, version)
    if found is not None and session.store.has(found.digest):
        return found
    shared = remote.layer_blob(diff_id, codec, level, version) if remote is not None else None
    if shared is not None:
        return BlobInfo(shared.digest, shared.size, shared.media_type)
    store: Any = session.store
    if progress is not None and codec != "none":
        counter = progress
        store = MeteredStore(store, lambda _d, done, total: counter(done, total))
    blob = compress_layer(store, diff_id, codec, level)
    session.index.put_compressed(diff_id, codec, level, version, blob)
    return blob


def import_record(session: Session, rec: Record, site: Site) -> None:
    """A shared cache's record, filed in the local index (its blobs are committed here)."""
    from cache.index.records import StepRecord

    now = time.time()
    session.index.put_step(
        StepRecord(
            key=rec.key,
            diff_id=rec.diff_id,
            layer_size=rec.layer_size,
            toc_digest=rec.toc.digest if rec.toc else None,
            config_delta=rec.config_delta,
            inputs=rec.inputs,
            dockerfile_id=site.dockerfile_id,
            stage=site.stage,
            position=site.position,
            created=now,
            last_used=now,
            hits=1,
            build_seconds=0.0,
        )
    )
    if rec.layer is not None and rec.diff_id is not None and session.store.has(rec.layer.digest):
        session.index.put_compressed(
            rec.diff_id,
            rec.codec,
            rec.level,
            rec.codec_version,
            BlobInfo(rec.layer.digest, rec.layer.size, rec.layer.media_type),
        )
