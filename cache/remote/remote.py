"""Reading and writing shared caches during a build.

:class:`RemoteCache` is what ``--cache-from`` opens: the records of every source (consulted in
order after the local index; the first source that has a key wins), fetched once per build and
kept in the content store by digest.  Nothing is downloaded for a hit until something needs
its bytes: the content store asks :meth:`RemoteCache.fetch` for a blob it lacks (a RUN's
parent chain, a ``COPY --from`` read, an export), and the blob is fetched and verified then;
an image the build keeps (``-t``) or writes out has its layer blobs fetched all at once
(:meth:`RemoteCache.prefetch`, in parallel) before it is tagged or written.
A record enters the local index only once its layer is committed to the local store.  A
source that cannot be read is a warning; a blob that cannot be fetched or does not verify
makes its step a miss (rebuilt), never a failure and never a wrong image.

:func:`export_cache` writes the artifact for ``--cache-to`` and ``lbuild cache export``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cache.errors import CorruptBlob, LbuildError
from cache.remote.artifact import (
    RECORDS_MEDIA_TYPE,
    Blob,
    Record,
    UnknownVersion,
    dump_records,
    load_records,
    manifest_for,
    records_descriptor,
)
from cache.remote.spec import CacheSpec
from cache.remote.transfer import ArtifactStore, open_store
from cache.types import Digest, StepKey

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore

Warn = Callable[[str], None]


class UnusableSharedBlob(CorruptBlob):
    """A shared cache's blob could not be fetched or did not verify.  Raised where its bytes
    were needed; the build meets it as a corrupt blob and builds again (once), this time
    treating every record that needs the blob as a miss."""

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(digest, "?")
        self.message = f"cache blob {digest} could not be used ({reason})"
        self.args = (self.message,)


def _failure_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


@dataclass
class RemoteCache:
    """The records of the ``--cache-from`` sources, and the blobs they can provide."""

    store: BlobStore
    warn: Warn
    records: dict[StepKey, tuple[Record, ArtifactStore]] = field(default_factory=dict)
    blobs: dict[Digest, tuple[Blob, ArtifactStore]] = field(default_factory=dict)
    layers: dict[Digest, tuple[Record, ArtifactStore]] = field(default_factory=dict)
    sources: list[ArtifactStore] = field(default_factory=list)
    fetched: list[Digest] = field(default_factory=list)
    failed: set[Digest] = field(default_factory=set)
    """Blobs that could not be used: records that need one are misses (shared with the
    build's second attempt)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _blob_locks: dict[Digest, threading.Lock] = field(default_factory=dict)
    """One lock per blob being fetched: different blobs download side by side, the same
    blob once."""

    @classmethod
    def open(
        cls,
        specs: Sequence[CacheSpec],
        store: BlobStore,
        warn: Warn,
        failed: set[Digest] | None = None,
    ) -> RemoteCache:
        """Read every source's records; a source that cannot be read is a warning."""
        rc = cls(store, warn)
        if failed is not None:
            rc.failed = failed
        for spec in specs:
            try:
                src = open_store(spec.type, spec.where)
            except (LbuildError, OSError) as e:
                warn(f"--cache-from {spec}: {_failure_text(e)}; not used")
                continue
            rc.sources.append(src)
            try:
                rc._add(src)
            except UnknownVersion as e:
                warn(f"--cache-from {spec}: {e} is not known to this lbuild; not used")
            except Exception as e:  # any fault of a source (network, corrupt, foreign) is a warning
                warn(f"--cache-from {spec}: cannot read the cache ({_failure_text(e)}); not used")
        return rc

    def _add(self, src: ArtifactStore) -> None:
        manifest = src.manifest()
        if manifest is None:
            self.warn(f"--cache-from {src.describe()}: no cache there yet")
            return
        desc = records_descriptor(manifest)
        if not self.store.has(desc.digest):  # records are cached by digest
            src.fetch(desc, self.store)
        for rec in load_records(self.store.read(desc.digest)):
            if rec.key in self.records:
                continue
            self.records[rec.key] = (rec, src)
            for b in rec.blobs():
                self.blobs.setdefault(b.digest, (b, src))
            if rec.diff_id is not None:
                self.layers.setdefault(rec.diff_id, (rec, src))

    def lookup(self, key: StepKey) -> Record | None:
        """The record of ``key``; None when a blob it needs has already proved unusable."""
        found = self.records.get(key)
        if found is None:
            return None
        rec = found[0]
        needed = [b.digest for b in rec.blobs()] + ([rec.diff_id] if rec.diff_id else [])
        return None if any(d in self.failed for d in needed) else rec

    def layer_blob(self, diff_id: Digest, codec: str, level: int, version: str) -> Blob | None:
        """A source's compressed blob of layer ``diff_id`` made exactly this way (codec,
        level, codec version), unless it proved unusable."""
        found = self.layers.get(diff_id)
        if found is None:
            return None
        rec = found[0]
        if rec.layer is None or rec.layer.digest in self.failed:
            return None
        if (rec.codec, rec.level, rec.codec_version) != (codec, level, version):
            return None
        return rec.layer

    def source_of(self, key: StepKey) -> str:
        found = self.records.get(key)
        return found[1].describe() if found is not None else ""

    def can_fetch(self, d: Digest) -> bool:
        return d not in self.failed and (d in self.blobs or d in self.layers)

    def _lock_for(self, d: Digest) -> threading.Lock:
        with self._lock:
            return self._blob_locks.setdefault(d, threading.Lock())

    def fetch(self, d: Digest) -> bool:
        """Commit blob ``d`` to the content store from a source (a layer tar by its diff_id is
        its compressed blob, decompressed and checked); False when no source has it.  A blob
        a source has but that cannot be fetched or does not verify is ``UnusableSharedBlob``.
        Safe from several threads: each blob is fetched once.  A source's blob that already
        proved unusable (in this build or an earlier attempt of it) is ``UnusableSharedBlob``
        again, never "not there": what needs it must be built instead."""
        if self.store.has(d):
            return True
        if d in self.failed and (d in self.blobs or d in self.layers):
            raise UnusableSharedBlob(d, "it could not be fetched or verified")
        if not self.can_fetch(d):
            return False
        with self._lock_for(d):
            if self.store.has(d):
                return True
            if d in self.failed:
                raise UnusableSharedBlob(d, "it could not be used before")
            try:
                self._fetch(d)
            except Exception as e:
                with self._lock:
                    self.failed.add(d)
                    if d in self.layers:
                        layer = self.layers[d][0].layer
                        if layer is not None:
                            self.failed.add(layer.digest)
                reason = _failure_text(e)
                self.warn(f"cache blob {d}: {reason}; what needs it is built instead")
                raise UnusableSharedBlob(d, reason) from None
            return True

    def prefetch(self, digests: Iterable[Digest], jobs: int = 8) -> None:
        """Fetch every blob of ``digests`` the store lacks, up to ``jobs`` at a time (the
        blobs an output needs, all at once rather than one by one as they are read).  The
        first that cannot be used is raised (``UnusableSharedBlob``) once the others end."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [d for d in dict.fromkeys(digests) if not self.store.has(d)]
        if len(todo) <= 1:
            for d in todo:
                self.fetch(d)
            return
        with ThreadPoolExecutor(min(jobs, len(todo)), thread_name_prefix="lbuild-fetch") as pool:
            futures = [pool.submit(self.fetch, d) for d in todo]
        for f in futures:
            f.result()

    def _fetch(self, d: Digest) -> None:
        if d in self.blobs:
            blob, src = self.blobs[d]
            src.fetch(blob, self.store)
            self.fetched.append(d)
            return
        from cache.errors import DigestMismatch
        from cache.layers.tar import import_layer

        rec, src = self.layers[d]
        assert rec.layer is not None
        with self._lock_for(rec.layer.digest):  # after d's own lock: never the other way
            if not self.store.has(rec.layer.digest):
                src.fetch(rec.layer, self.store)
                self.fetched.append(rec.layer.digest)
        with self.store.open(rec.layer.digest) as f:
            info = import_layer(self.store, f, rec.layer.media_type)
        if info.diff_id != d:
            raise DigestMismatch(f"layer of cache record {rec.key}", d, info.diff_id)

    def mount_sources(self) -> dict[str, str]:
        """Blob digest -> ``domain/path`` of the registry repository that has it (a push to
        the same registry mounts them instead of downloading and uploading)."""
        from cache.remote.transfer import RegistryStore

        out: dict[str, str] = {}
        for d, (_, src) in self.blobs.items():
            if isinstance(src, RegistryStore):
                out[d] = src.ref.repository
        return out

    def close(self) -> None:
        for s in self.sources:
            s.close()


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: records, blobs uploaded and already there, bytes uploaded."""

    destination: str
    records: int
    uploaded: int
    present: int
    bytes_uploaded: int
    manifest_digest: Digest


def export_cache(
    spec: CacheSpec,
    records: Iterable[Record],
    store: BlobStore,
    *,
    known_present: Iterable[Digest] = (),
) -> ExportResult:
    """Write ``records`` with their blobs to ``spec``'s destination, replacing its artifact.

    Blobs first (a HEAD for each, in parallel on registries; none for blobs the import already
    proved present), the records blob next, the manifest last.
    """
    import hashlib

    recs = list(records)
    blobs = sorted({b.digest: b for r in recs for b in r.blobs()}.values(), key=lambda b: b.digest)
    data = dump_records(recs)
    records_blob = Blob(store.put(data), len(data), RECORDS_MEDIA_TYPE)
    dest = open_store(spec.type, spec.where)
    try:
        proved = set(known_present)
        todo = [b for b in blobs if b.digest not in proved]
        there = dest.present([*todo, records_blob])
        uploaded = 0
        sent = 0
        for b in [*todo, records_blob]:
            if b.digest in there:
                continue
            dest.put(b, store)
            uploaded += 1
            sent += b.size
        manifest = manifest_for(records_blob, blobs)
        dest.put_manifest(manifest)
    finally:
        dest.close()
    return ExportResult(
        str(spec),
        len(recs),
        uploaded,
        len(blobs) + 1 - uploaded,
        sent,
        Digest("sha256:" + hashlib.sha256(manifest).hexdigest()),
    )
