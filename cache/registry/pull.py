"""Pull an image into the content store: resolve, pick the platform, fetch what is missing.

Order: the manifest (and the index above it) is fetched and verified first but stored
last, after the config and every layer, so a manifest in the store always has its blobs.
Blobs already present are never fetched again; missing ones stream in parallel (``jobs``
at a time) through the store's ingest, which verifies the digest and renames atomically:
a killed pull leaves only an ingest temp file, never a partial blob.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from cache.errors import DigestMismatch, InvalidInput, NotFound, Unsupported
from cache.registry.client import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Manifest,
    Progress,
    Repository,
    Restart,
    sha256,
)
from cache.registry.errors import RegistryError
from cache.registry.reference import Reference
from cache.registry.transport import Transport

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore

Platform = tuple[str, str, str]
T = TypeVar("T")
DEFAULT_JOBS = 6


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class PulledImage:
    """What a pull resolved: the platform's manifest (and the index it was picked from)."""

    ref: Reference
    manifest_digest: str
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index_digest: str | None = None
    fetched: tuple[str, ...] = ()
    """Blobs this pull downloaded (those already in the store are not)."""


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` -> (os, arch, variant) (``InvalidInput`` otherwise)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidInput(f"invalid platform {text!r}: expected os/arch[/variant]")
    os_, arch = parts[0].lower(), parts[1].lower()
    variant = parts[2].lower() if len(parts) == 3 else ""
    return os_, arch, variant


def format_platform(p: Platform) -> str:
    return "/".join(x for x in p if x)


def host_platform() -> Platform:
    from cache.platform import host_platform as host

    return host()


def _norm_variant(arch: str, variant: str) -> str:
    # Docker's normalisation: arm64 means v8, arm means v7 when not said.
    if arch == "arm64" and variant == "v8":
        return ""
    if arch == "arm" and variant == "":
        return "v7"
    return variant


def select_platform(index: dict[str, Any], want: Platform, what: str) -> dict[str, Any]:
    """The index entry for ``want``; attestation (unknown/unknown) entries are skipped."""
    os_, arch, variant = want
    exact: list[dict[str, Any]] = []
    loose: list[dict[str, Any]] = []
    for entry in index.get("manifests") or []:
        if entry.get("mediaType") not in MANIFEST_TYPES or entry.get("mediaType") in INDEX_TYPES:
            continue
        p = entry.get("platform") or {}
        if p.get("os") == "unknown" or p.get("architecture") == "unknown":
            continue
        if p.get("os") != os_ or p.get("architecture") != arch:
            continue
        theirs = _norm_variant(arch, str(p.get("variant", "")))
        if theirs == _norm_variant(arch, variant):
            exact.append(entry)
        elif not variant:
            loose.append(entry)
    found = exact or loose
    if not found:
        raise RegistryError(
            f"pull {what}: no match for platform {format_platform(want)} in the manifest list"
        )
    return found[0]


def _descriptors(manifest: dict[str, Any], what: str) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    try:
        c = manifest["config"]
        config = Descriptor(str(c["digest"]), int(c["size"]), str(c.get("mediaType", "")))
        layers = tuple(
            Descriptor(str(x["digest"]), int(x["size"]), str(x.get("mediaType", "")))
            for x in manifest.get("layers") or []
        )
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(f"pull {what}: malformed manifest ({e})") from None
    for d in (config, *layers):
        if not d.digest.startswith("sha256:") or len(d.digest) != 71:
            raise Unsupported(f"pull {what}: only sha256 blobs are supported ({d.digest})")
    return config, layers


def _local_manifest(store: BlobStore, digest: str) -> Manifest | None:
    from cache.types import Digest

    if not store.has(Digest(digest)):
        return None
    raw = store.read(Digest(digest))
    body = json.loads(raw)
    media = body.get("mediaType") or ("application/vnd.oci.image.index.v1+json"
                                      if "manifests" in body else
                                      "application/vnd.oci.image.manifest.v1+json")
    return Manifest(digest, str(media), raw)


def resolve(repo: Repository, store: BlobStore, ref: Reference,
            platform: Platform) -> tuple[Manifest, Manifest | None]:
    """(platform manifest, index or None): from the store when the digest is known there."""
    top = _local_manifest(store, ref.digest) if ref.digest else None
    if top is None:
        top = repo.get_manifest(ref.reference)
        if ref.digest and top.digest != ref.digest:
            raise RegistryError(f"pull {ref}: the registry sent manifest {top.digest}")
    if top.media_type not in INDEX_TYPES:
        return top, None
    entry = select_platform(top.json(), platform, str(ref))
    child = _local_manifest(store, entry["digest"]) or repo.get_manifest(entry["digest"])
    if child.digest != entry["digest"]:
        raise RegistryError(f"pull {ref}: the registry sent manifest {child.digest}")
    if child.media_type in INDEX_TYPES:
        raise Unsupported(f"pull {ref}: an index inside an index is not supported")
    return child, top


def fetch_blob(repo: Repository, store: BlobStore, d: Descriptor,
               progress: Progress | None) -> bool:
    """Fetch blob ``d`` into the store unless it is there; True when it was downloaded."""
    from cache.types import Digest

    if store.has(Digest(d.digest)):
        if progress is not None:
            progress(d.digest, d.size, d.size)
        return False
    for _ in range(3):
        try:
            try:
                with store.ingest(Digest(d.digest)) as w:  # the ingest verifies the sha256
                    repo.fetch_blob(d.digest, d.size, w, progress, verify=False)
            except DigestMismatch as e:
                raise DigestMismatch(f"pull {repo.ref}: blob", e.expected, e.actual) from None
            return True
        except Restart:
            continue  # the registry ignored Range: the ingest is discarded, start over
    raise RegistryError(f"pull {repo.ref}: blob {d.digest} could not be resumed or restarted")


def pull(
    store: BlobStore,
    ref: Reference,
    *,
    platform: Platform | None = None,
    progress: Progress | None = None,
    jobs: int = DEFAULT_JOBS,
    transport: Transport | None = None,
) -> PulledImage:
    """Pull ``ref`` for ``platform`` (default: the host) into ``store``."""
    want = platform or host_platform()
    own = transport is None
    t = transport or Transport(ref.registry_host)
    try:
        repo = Repository(t, ref)
        manifest, index = resolve(repo, store, ref, want)
        config, layers = _descriptors(manifest.json(), str(ref))
        blobs = _unique((config, *layers))
        got = in_parallel(lambda d, tick: fetch_blob(repo, store, d, tick), blobs, jobs,
                          progress)
        fetched = tuple(d.digest for d, g in zip(blobs, got, strict=True) if g)
        for m in (manifest, index):
            if m is not None:
                store_manifest(store, m)
        return PulledImage(ref, manifest.digest, manifest.media_type, config, layers,
                           index.digest if index else None, fetched)
    finally:
        if own:
            t.close()


class Cancelled(Exception):
    """Another blob of the same pull or push failed, or the process is being interrupted."""


def in_parallel(fn: Callable[[Any, Progress], T], items: Sequence[Any], jobs: int,
                progress: Progress | None) -> list[T]:
    """``fn(item, tick)`` for every item on up to ``jobs`` threads, results in order.

    When one fails or the caller is interrupted (SIGINT), the others stop at their next
    chunk (``tick`` raises) and clean up (an ingest removes its temp file) before this
    returns: nothing is left running or half-written.
    """
    cancel = threading.Event()

    def tick(digest: str, done: int, total: int) -> None:
        if cancel.is_set():
            raise Cancelled(digest)
        if progress is not None:
            progress(digest, done, total)

    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items))))
    try:
        return list(pool.map(lambda x: fn(x, tick), items))
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def store_manifest(store: BlobStore, m: Manifest) -> None:
    from cache.types import Digest

    if sha256(m.raw) != m.digest:
        raise RegistryError(f"manifest {m.digest}: bytes changed in memory")
    if not store.has(Digest(m.digest)):
        with store.ingest(Digest(m.digest)) as w:
            w.write(m.raw)


def _unique(ds: Sequence[Descriptor]) -> list[Descriptor]:
    seen: set[str] = set()
    out: list[Descriptor] = []
    for d in ds:
        if d.digest not in seen:
            seen.add(d.digest)
            out.append(d)
    return out


def check_present(store: BlobStore, image: PulledImage) -> None:
    """NotFound unless every blob of ``image`` is in the store."""
    from cache.types import Digest

    for d in (image.config, *image.layers):
        if not store.has(Digest(d.digest)):
            raise NotFound(f"image {image.ref}: blob {d.digest} is not in the store")



def remote_digest(ref: Reference, *, transport: Transport | None = None) -> str:
    """The digest ``ref``'s tag points at now: one manifest HEAD (a GET if the registry
    gives no ``Docker-Content-Digest``).  Docker Hub counts GETs, not HEADs."""
    own = transport is None
    t = transport or Transport(ref.registry_host)
    try:
        repo = Repository(t, ref)
        head = repo.head_manifest(ref.reference)
        if head is not None:
            return head[0]
        return repo.get_manifest(ref.reference).digest
    finally:
        if own:
            t.close()
