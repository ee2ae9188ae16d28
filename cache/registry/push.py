"""Push an image (or index) from the content store to a registry, manifest last.

For each blob: HEAD first (present -> nothing to send); else a cross-repository mount when
the caller says the blob came from another repository of the same registry; else an upload
(monolithic up to 8 MiB, chunked above), hashed as it streams: a blob of the store that no
longer matches its name is cut off before the registry commits it, removed from the store,
and ``CorruptBlob`` raised (a build then makes it again).  Blobs go in parallel (``jobs`` at a time).  The
manifest is PUT only after every blob it names is in the registry, so a failed push never
leaves a manifest pointing at missing blobs.  The manifest's bytes are the store's, so the
pushed digest is the one the OCI layout output names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cache.errors import CorruptBlob, NotFound, Unsupported
from cache.registry.client import (
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Progress,
    Repository,
    UploadMismatch,
)
from cache.registry.errors import RegistryError
from cache.registry.pull import in_parallel
from cache.registry.reference import Reference
from cache.registry.transport import Transport
from cache.types import Digest

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore

DEFAULT_JOBS = 6


@dataclass(frozen=True)
class PushResult:
    ref: Reference
    digest: str
    uploaded: tuple[str, ...]
    mounted: tuple[str, ...]
    present: tuple[str, ...]


def _manifest(store: BlobStore, digest: str) -> tuple[bytes, dict[str, Any], str]:
    if not store.has(Digest(digest)):
        raise NotFound(f"manifest {digest} is not in the store")
    raw = store.read(Digest(digest))
    body: dict[str, Any] = json.loads(raw)
    media = body.get("mediaType") or (OCI_INDEX if "manifests" in body else OCI_MANIFEST)
    return raw, body, str(media)


def _blobs(body: dict[str, Any]) -> list[tuple[str, int]]:
    out = [(str(body["config"]["digest"]), int(body["config"]["size"]))]
    out += [(str(x["digest"]), int(x["size"])) for x in body.get("layers") or []]
    unique: dict[str, int] = {}
    for d, size in out:
        unique.setdefault(d, size)
    return list(unique.items())


class _Pusher:
    def __init__(self, store: BlobStore, repo: Repository, mount_from: Mapping[str, str],
                 progress: Progress | None, jobs: int) -> None:
        self.store = store
        self.repo = repo
        self.mount_from = mount_from
        self.progress = progress
        self.jobs = jobs
        self.uploaded: list[str] = []
        self.mounted: list[str] = []
        self.present: list[str] = []

    def blob(self, digest: str, size: int, tick: Progress) -> None:
        if self.repo.has_blob(digest, push=True):
            self.present.append(digest)
        else:
            domain, _, source = self.mount_from.get(digest, "").partition("/")
            if (source and domain == self.repo.ref.domain and source != self.repo.name
                    and self.repo.mount_blob(digest, source)):
                self.mounted.append(digest)
            else:
                if not self.store.ensure(Digest(digest)):
                    raise NotFound(f"push {self.repo.ref}: blob {digest} is not in the store")
                self._upload(Digest(digest), size, tick)
                self.uploaded.append(digest)
                return
        tick(digest, size, size)

    def _upload(self, digest: Digest, size: int, tick: Progress) -> None:
        """Send a blob of the store, hashed on its way out (issue 11 item 7): bytes that are
        not ``digest`` are cut off before the registry commits them, the blob is removed
        from the store and ``CorruptBlob`` raised -- before any manifest is put."""
        try:
            self.repo.upload_blob(digest, size, self.store.path(digest), tick)
        except UploadMismatch as e:
            self.store.remove(digest)
            bad = CorruptBlob(digest, e.actual)
            bad.hint = "it was removed from the store; build the image again to push it"
            raise bad from None
        self.store.vouch(digest, digest)

    def image(self, digest: str, tag: str | None) -> None:
        """Push manifest ``digest`` (and first everything it names) under ``tag``.

        Everything is checked to be in the store before the first request is sent.
        """
        plan = _plan(self.store, digest, str(self.repo.ref))
        for i, (d, raw, media, blobs) in enumerate(plan):
            if blobs:
                in_parallel(lambda b, tick: self.blob(b[0], b[1], tick), blobs, self.jobs, self.progress)
            got = self.repo.put_manifest(tag if i == len(plan) - 1 and tag else d, raw, media)
            if got != d:
                raise RegistryError(f"push {self.repo.ref}: manifest digest {got} != {d}")


def _plan(store: BlobStore, digest: str,
          what: str) -> list[tuple[str, bytes, str, list[tuple[str, int]]]]:
    """(manifest digest, raw bytes, media type, blobs) in push order: children first."""
    raw, body, media = _manifest(store, digest)
    if media in INDEX_TYPES:
        out = []
        for child in body.get("manifests") or []:
            out += _plan(store, str(child["digest"]), what)
        return [*out, (digest, raw, media, [])]
    blobs = _blobs(body)
    for d, _ in blobs:  # in the store, or fetched from a shared cache when it must be sent
        if not store.available(Digest(d)):
            raise NotFound(f"push {what}: blob {d} is not in the store")
    return [(digest, raw, media, blobs)]


def push(
    store: BlobStore,
    manifest_digest: str,
    refs: Sequence[Reference],
    *,
    mount_from: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
) -> list[PushResult]:
    """Push the image ``manifest_digest`` to every reference in ``refs``.

    ``mount_from`` maps a blob digest to the repository it came from (``domain/path``); it
    is tried as a cross-repository mount when that repository is on a target's registry.
    """
    results: list[PushResult] = []
    transports: dict[str, Transport] = {}
    try:
        for ref in refs:
            if ref.digest is not None and ref.digest != manifest_digest:
                raise Unsupported(f"push {ref}: a digest reference that is not this image's")
            t = transports.get(ref.registry_host)
            if t is None:
                t = transports[ref.registry_host] = Transport(ref.registry_host)
            p = _Pusher(store, Repository(t, ref), mount_from or {}, progress, jobs)
            p.image(manifest_digest, ref.tag if ref.digest is None else None)
            results.append(PushResult(ref, manifest_digest, tuple(p.uploaded),
                                      tuple(p.mounted), tuple(p.present)))
    finally:
        for t in transports.values():
            t.close()
    return results
