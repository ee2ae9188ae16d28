"""The distribution API on one repository: manifests, blobs, uploads, mounts.

Manifests are kept as the registry's raw bytes and verified against the digest they were
asked by (or the ``Docker-Content-Digest`` the registry gave).  A blob streams into a
:class:`BlobSink` (the content store's ingest) while its sha256 is computed; a dropped
connection resumes with ``Range`` where the registry answers 206, otherwise starts over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin

from cache.errors import DigestMismatch, Unsupported
from cache.registry.errors import RegistryError
from cache.registry.httplib import httpx
from cache.registry.reference import Reference
from cache.registry.transport import Transport, error_text

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
ACCEPT = ", ".join(MANIFEST_TYPES)
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20
MONOLITHIC_MAX = 8 << 20
"""Blobs up to this size go up in one PUT; larger ones in PATCH chunks of UPLOAD_CHUNK."""
UPLOAD_CHUNK = 16 << 20
BLOB_ATTEMPTS = 4

Progress = Callable[[str, int, int], None]
"""``progress(digest, bytes_done, bytes_total)``, called as a blob moves (any thread)."""


class BlobSink(Protocol):
    """Where a download goes: the content store's ingest writer (``BlobWriter``)."""

    def write(self, b: bytes | bytearray | memoryview) -> int: ...


@dataclass(frozen=True)
class Manifest:
    """A manifest or index exactly as the registry sent it."""

    digest: str
    media_type: str
    raw: bytes

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.raw)
        return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Restart(Exception):
    """The registry ignored a Range request: the partial download must start over."""


class Repository:
    """One repository (``ref.path``) on the registry reached by ``transport``."""

    def __init__(self, transport: Transport, ref: Reference) -> None:
        self.t = transport
        self.ref = ref
        self.name = ref.path
        self.pull_scope: tuple[str, ...] = (f"repository:{ref.path}:pull",)
        self.push_scope: tuple[str, ...] = (f"repository:{ref.path}:pull,push",)

    def _fail(self, what: str, resp: httpx.Response) -> RegistryError:
        code, text = error_text(resp)
        if resp.status_code in (401, 403) and what.startswith("pull"):
            text = f"pull access denied or repository does not exist ({text})"
        elif resp.status_code == 401:
            text = f"unauthorized ({text})" if "unauthorized" not in text else text
        return RegistryError(f"{what} {self.ref}: {text}", status=resp.status_code, code=code)

    # -- manifests --------------------------------------------------------------------------
    def head_manifest(self, reference: str) -> tuple[str, str] | None:
        """(digest, media type) of a manifest by one HEAD, or None when it does not exist."""
        resp = self.t.request("HEAD", f"/v2/{self.name}/manifests/{reference}",
                              scopes=self.pull_scope, headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail("pull", resp)
        digest = resp.headers.get("docker-content-digest")
        if not digest:
            return None  # the caller falls back to a GET
        return digest, resp.headers.get("content-type", "").split(";")[0]

    def get_manifest(self, reference: str) -> Manifest:
        """GET a manifest or index; its bytes are verified against its digest."""
        resp = self.t.request("GET", f"/v2/{self.name}/manifests/{reference}",
                              scopes=self.pull_scope, headers={"Accept": ACCEPT})
        if resp.status_code == 404:
            code, text = error_text(resp)
            raise RegistryError(f"pull {self.ref}: {text if code else 'manifest unknown'}",
                                status=404, code=code or "MANIFEST_UNKNOWN")
        if resp.status_code != 200:
            raise self._fail("pull", resp)
        raw = resp.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"pull {self.ref}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        actual = sha256(raw)
        expected = reference if reference.startswith("sha256:") else (
            resp.headers.get("docker-content-digest") or actual)
        if reference.startswith(("sha384:", "sha512:")):
            raise Unsupported(f"pull {self.ref}: only sha256 manifest digests are supported")
        if actual != expected:
            raise DigestMismatch(f"manifest of {self.ref}", expected, actual)
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise RegistryError(f"pull {self.ref}: the manifest is not JSON") from e
        media = body.get("mediaType") or media
        if media not in MANIFEST_TYPES:
            if body.get("schemaVersion") == 1 or "schema1" in media:
                raise Unsupported(f"pull {self.ref}: Docker schema 1 manifests are not supported")
            if "manifests" in body:
                media = OCI_INDEX
            elif "layers" in body:
                media = OCI_MANIFEST
            else:
                raise Unsupported(f"pull {self.ref}: unknown manifest media type {media!r}")
        return Manifest(actual, media, raw)

    def put_manifest(self, reference: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest."""
        resp = self.t.request("PUT", f"/v2/{self.name}/manifests/{reference}",
                              scopes=self.push_scope,
                              headers={"Content-Type": media_type}, content=raw)
        if resp.status_code not in (200, 201, 202):
            raise self._fail("push", resp)
        digest = sha256(raw)
        given = resp.headers.get("docker-content-digest")
        if given and given != digest:
            raise DigestMismatch(f"pushed manifest of {self.ref}", digest, given)
        return digest

    # -- blobs ------------------------------------------------------------------------------
    def has_blob(self, digest: str, *, push: bool = False) -> bool:
        """Whether the repository has blob ``digest`` (one HEAD)."""
        resp = self.t.request("HEAD", f"/v2/{self.name}/blobs/{digest}",
                              scopes=self.push_scope if push else self.pull_scope)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._fail("push" if push else "pull", resp)

    def fetch_blob(self, digest: str, size: int, sink: BlobSink,
                   progress: Progress | None = None, *, verify: bool = True) -> None:
        """Stream blob ``digest`` into ``sink``, verifying it; resumes with Range when it can.

        Raises Restart when a resumed download cannot continue (the sink must be discarded),
        DigestMismatch when the bytes are not the blob's.  ``verify=False`` leaves the sha256
        to a sink that computes it anyway (the content store's ingest, given the expected
        digest): the size is still checked here.
        """
        h = hashlib.sha256() if verify else None
        done = 0
        attempt = 0
        while True:
            # identity: the bytes as stored (a gzip transfer encoding would change what
            # iter_raw yields and so the digest), which Range offsets also count
            headers = {"Accept-Encoding": "identity"}
            if done:
                headers["Range"] = f"bytes={done}-"
            resp = self.t.request("GET", f"/v2/{self.name}/blobs/{digest}",
                                  scopes=self.pull_scope, headers=headers, stream=True)
            try:
                if resp.status_code == 200 and done:
                    raise Restart(digest)
                if resp.status_code not in (200, 206):
                    resp.read()
                    if resp.status_code == 404:
                        raise RegistryError(f"pull {self.ref}: blob unknown: {digest}",
                                            status=404, code="BLOB_UNKNOWN")
                    raise self._fail("pull", resp)
                if resp.status_code == 206 and not resp.headers.get(
                        "content-range", "").startswith(f"bytes {done}-"):
                    raise Restart(digest)
                try:
                    for chunk in resp.iter_raw():
                        if done + len(chunk) > size:
                            raise DigestMismatch(f"blob {digest} (longer than {size} bytes)",
                                                 digest, "?")
                        sink.write(chunk)
                        if h is not None:
                            h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(digest, done, size)
                except (httpx.TransportError, httpx.StreamError):
                    if attempt + 1 >= BLOB_ATTEMPTS:
                        raise RegistryError(
                            f"pull {self.ref}: blob {digest}: connection lost after "
                            f"{done} of {size} bytes, {BLOB_ATTEMPTS} times") from None
                    attempt += 1
                    self.t._sleep(attempt - 1, None)
                    continue
            finally:
                resp.close()
            if done < size and attempt + 1 < BLOB_ATTEMPTS:
                attempt += 1
                continue
            break
        if done != size:
            raise DigestMismatch(f"blob {digest} of {self.ref} ({done} of {size} bytes)",
                                 digest, "?")
        if h is not None and "sha256:" + h.hexdigest() != digest:
            raise DigestMismatch(f"blob of {self.ref}", digest, "sha256:" + h.hexdigest())

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount (POST ?mount=&from=): True when the registry mounted it."""
        scopes = (*self.push_scope, f"repository:{from_repo}:pull")
        resp = self.t.request(
            "POST", f"/v2/{self.name}/blobs/uploads/?mount={digest}&from={from_repo}",
            scopes=scopes, headers={"Content-Length": "0"})
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:
            self._cancel(resp)
            return False
        raise self._fail("push", resp)

    def _cancel(self, resp: httpx.Response) -> None:
        loc = resp.headers.get("location")
        if loc:
            self.t.request("DELETE", urljoin(str(resp.url), loc), scopes=self.push_scope)

    def upload_blob(self, digest: str, size: int, path: Path,
                    progress: Progress | None = None) -> None:
        """Upload the file at ``path`` as blob ``digest``: POST, then PUT (or PATCHes + PUT).

        The bytes are hashed as they stream out; when they are not ``digest`` (or not
        ``size`` bytes) the upload is cut off before it completes -- a monolithic PUT's body
        stops before its last chunk, a chunked upload before its closing PUT -- and
        cancelled, and ``UploadMismatch`` is raised: the registry never commits them."""
        resp = self.t.request("POST", f"/v2/{self.name}/blobs/uploads/", scopes=self.push_scope,
                              headers={"Content-Length": "0"})
        if resp.status_code not in (202, 201):
            raise self._fail("push", resp)
        loc = self._location(resp)
        check = _UploadCheck(digest, size)
        try:
            if size > MONOLITHIC_MAX:
                loc = self._patch_chunks(loc, digest, size, path, check, progress)
                check.done()
                body: bytes | Callable[[], Iterator[bytes]] = b""
            else:
                body = _checked_body(path, check)
            resp = self.t.request(
                "PUT", _with_digest(loc, digest), scopes=self.push_scope, content=body,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(0 if size > MONOLITHIC_MAX else size)})
        except UploadMismatch:
            self._drop_upload(loc)
            raise
        if resp.status_code != 201:
            raise self._fail("push", resp)
        if progress is not None:
            progress(digest, size, size)

    def _patch_chunks(self, loc: str, digest: str, size: int, path: Path,
                      check: _UploadCheck, progress: Progress | None) -> str:
        """Send ``path`` in PATCH chunks, each hashed before it goes; the next location."""
        sent = 0
        with open(path, "rb") as f:
            while sent < size:
                data = f.read(min(UPLOAD_CHUNK, size - sent))
                if not data:
                    break  # shorter than its size: ``check.done`` says so
                check.add(data)
                end = sent + len(data) - 1
                resp = self.t.request(
                    "PATCH", loc, scopes=self.push_scope, content=data,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{sent}-{end}"})
                if resp.status_code != 202:
                    raise self._fail("push", resp)
                loc = self._location(resp)
                sent += len(data)
                if progress is not None:
                    progress(digest, sent, size)
        return loc

    def _drop_upload(self, loc: str) -> None:
        """Best effort: drop an upload session (distribution's DELETE on its location)."""
        with contextlib.suppress(RegistryError):
            self.t.request("DELETE", loc, scopes=self.push_scope)

    @staticmethod
    def _location(resp: httpx.Response) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(f"{resp.url.host}: an upload answer has no Location header")
        return str(urljoin(str(resp.url), loc))


def _with_digest(url: str, digest: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}digest={digest}"


class UploadMismatch(DigestMismatch):
    """The bytes an upload read from the store are not the blob it was pushing."""

    def __init__(self, digest: str, actual: str) -> None:
        super().__init__(f"upload of blob {digest}", digest, actual)
        self.digest = digest


class _UploadCheck:
    """sha256 and length of what an upload has read so far, against what it must send."""

    def __init__(self, digest: str, size: int) -> None:
        self.digest = digest
        self.size = size
        self._h = hashlib.sha256()
        self._n = 0

    def add(self, data: bytes) -> None:
        self._h.update(data)
        self._n += len(data)
        if self._n > self.size:
            raise UploadMismatch(self.digest, f"more than {self.size} bytes")

    def done(self) -> None:
        actual = "sha256:" + self._h.hexdigest()
        if self._n != self.size or actual != self.digest:
            raise UploadMismatch(self.digest, actual if self._n == self.size
                                 else f"{self._n} bytes instead of {self.size}")


def _checked_body(path: Path, check: _UploadCheck) -> Callable[[], Iterator[bytes]]:
    """A PUT body (re-made on a retry) that checks the whole blob before its last chunk:
    a mismatch raises inside the request, so the registry gets a short body, never all."""
    def body() -> Iterator[bytes]:
        c = _UploadCheck(check.digest, check.size)
        with open(path, "rb") as f:
            chunk = f.read(CHUNK)
            while True:
                following = f.read(CHUNK) if chunk else b""
                c.add(chunk)
                if not following:
                    c.done()
                if chunk:
                    yield chunk
                if not following:
                    return
                chunk = following
    return body

