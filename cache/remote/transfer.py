"""Where a cache artifact lives: an OCI image layout directory or a registry repository.

Both sides speak one small contract (:class:`ArtifactStore`): read the current manifest,
fetch a blob into the content store (verified: the store's ingest checks the digest before
anything is committed), say which blobs are already there, put blobs, and replace the
manifest last.  Writers put every blob before the manifest that names it, so an interrupted
export leaves the previous artifact whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cache.errors import InvalidInput, NotFound
from cache.remote.artifact import ARTIFACT_TYPE, OCI_MANIFEST, Blob
from cache.types import Digest, digest_hex

if TYPE_CHECKING:
    from cache.registry.client import Repository
    from cache.store.blobs import BlobStore

REF_NAME = "latest"
"""The tag the artifact has in an OCI layout (``oci:DIR:latest`` for skopeo)."""
HEAD_JOBS = 8


class ArtifactStore(Protocol):
    """One place a cache artifact is read from and written to."""

    def describe(self) -> str: ...
    def manifest(self) -> bytes | None: ...
    def fetch(self, blob: Blob, store: BlobStore) -> None: ...
    def present(self, blobs: Iterable[Blob]) -> set[Digest]: ...
    def put(self, blob: Blob, store: BlobStore) -> None: ...
    def put_manifest(self, manifest: bytes) -> None: ...
    def close(self) -> None: ...


class LayoutStore:
    """An OCI image layout directory (``type=local``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return f"type=local,{self.root}"

    def _blob(self, d: Digest) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(d)

    def manifest(self) -> bytes | None:
        index = self.root / "index.json"
        if not index.exists():
            return None
        try:
            body = json.loads(index.read_bytes())
            descs = [m for m in body.get("manifests", []) if isinstance(m, dict)]
        except (OSError, ValueError, AttributeError) as e:
            raise InvalidInput(f"{self.root}: index.json is not an OCI index ({e})") from None
        ours = [m for m in descs if m.get("artifactType") == ARTIFACT_TYPE] or descs
        if not ours:
            return None
        d = Digest(str(ours[0].get("digest", "")))
        try:
            data = self._blob(d).read_bytes()
        except (OSError, ValueError) as e:
            raise NotFound(f"{self.root}: manifest {d} is missing ({e})") from None
        import hashlib

        if "sha256:" + hashlib.sha256(data).hexdigest() != d:
            raise InvalidInput(f"{self.root}: manifest {d} does not match its digest")
        return data

    def fetch(self, blob: Blob, store: BlobStore) -> None:
        path = self._blob(blob.digest)
        if not path.is_file():
            raise NotFound(f"{self.root}: blob {blob.digest} is missing")
        with open(path, "rb") as src:
            store.put_stream(src, blob.digest)

    def present(self, blobs: Iterable[Blob]) -> set[Digest]:
        return {b.digest for b in blobs if _same_size(self._blob(b.digest), b.size)}

    def put(self, blob: Blob, store: BlobStore) -> None:
        dest = self._blob(blob.digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        store.check_out(blob.digest)
        shutil.copyfile(store.path(blob.digest), tmp)
        os.replace(tmp, dest)

    def put_manifest(self, manifest: bytes) -> None:
        import hashlib

        d = Digest("sha256:" + hashlib.sha256(manifest).hexdigest())
        dest = self._blob(d)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(manifest)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "artifactType": ARTIFACT_TYPE,
                    "digest": d,
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": REF_NAME},
                }
            ],
        }
        tmp = self.root / f"index.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(index, sort_keys=True, indent=2))
        os.replace(tmp, self.root / "index.json")  # the ref moves in one step
        self._sweep(manifest, d)

    def _sweep(self, manifest: bytes, d: Digest) -> None:
        """Remove blobs the new artifact no longer names (after the ref moved)."""
        body = json.loads(manifest)
        keep = {d, body["config"]["digest"], *(x["digest"] for x in body.get("layers", []))}
        for p in (self.root / "blobs" / "sha256").iterdir():
            if f"sha256:{p.name}" not in keep:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        pass


class RegistryStore:
    """A repository of a distribution registry (``type=registry,ref=REF``)."""

    def __init__(self, ref_text: str) -> None:
        from cache.registry.client import Repository
        from cache.registry.reference import parse
        from cache.registry.transport import Transport

        self.ref = parse(ref_text)
        self._t = Transport(self.ref.registry_host)
        self.repo: Repository = Repository(self._t, self.ref)

    def describe(self) -> str:
        return f"type=registry,ref={self.ref}"

    def manifest(self) -> bytes | None:
        from cache.registry.errors import RegistryError

        try:
            m = self.repo.get_manifest(self.ref.reference)
        except RegistryError as e:
            if e.status == 404 or e.code in ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"):
                return None
            raise
        return m.raw

    def fetch(self, blob: Blob, store: BlobStore) -> None:
        with store.ingest(blob.digest) as w:
            self.repo.fetch_blob(blob.digest, blob.size, w, verify=False)

    def present(self, blobs: Iterable[Blob]) -> set[Digest]:
        todo = list(blobs)
        with ThreadPoolExecutor(HEAD_JOBS) as pool:
            there = list(pool.map(lambda b: self.repo.has_blob(b.digest, push=True), todo))
        return {b.digest for b, yes in zip(todo, there, strict=True) if yes}

    def put(self, blob: Blob, store: BlobStore) -> None:
        store.check_out(blob.digest)
        self.repo.upload_blob(blob.digest, blob.size, store.path(blob.digest))

    def put_manifest(self, manifest: bytes) -> None:
        self.repo.put_manifest(self.ref.tag or REF_NAME, manifest, OCI_MANIFEST)

    def close(self) -> None:
        self._t.close()


def _same_size(p: Path, size: int) -> bool:
    try:
        return p.stat().st_size == size
    except OSError:
        return False


def open_store(type_: str, where: str) -> ArtifactStore:
    """The artifact store a ``CacheSpec`` names."""
    if type_ == "local":
        return LayoutStore(Path(where))
    return RegistryStore(where)
