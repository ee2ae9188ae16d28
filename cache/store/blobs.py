"""A content-addressed blob store on the local filesystem (containerd's local store layout).

Vocabulary and lifecycle:
- a *blob* is a byte string named by its sha256 ``Digest``; it lives at
  ``<root>/blobs/sha256/<hex>`` as a read-only (0444) file and never changes;
- an *ingest* writes a new blob: bytes go to a private temp file under ``<root>/tmp/``
  while their sha256 is computed; on success the file is fsynced, its digest compared with
  what the caller expected, and it is renamed into place.  Content is invisible until it is
  committed, and a blob that is already present is an ordinary success, so two processes
  writing the same blob at once both succeed;
- ``tmp/`` may be shared with other parts of lbuild: ``sweep_tmp`` removes only this store's
  own ingest files, and only old ones, so it is safe while other builders are running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from cache.errors import CorruptBlob, DigestMismatch, InvalidInput, NotFound, StoreError
from cache.types import Digest, digest_hex, sha256_digest

_INGEST_PREFIX = "ingest-"
_CHUNK = 1 << 20
_WRITE_BUFFER = 1 << 20
"""Buffer of an ingest's temp file.  Layer tars arrive as many small writes (a header, a few
KB of data, padding): with the default 8 KiB buffer most of them cost a write syscall."""
_HEX = frozenset("0123456789abcdef")
_RACY_S = 2.0
"""A verified stamp is written only for a blob last written this long ago (``_write_stamp``)."""


def _sha256_of(f: BinaryIO) -> Digest:
    """The digest of what is left to read in ``f``."""
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return sha256_digest(h.hexdigest())


def _identity(st: os.stat_result) -> str:
    # not the ctime: exports hard-link blobs, and every link made or removed changes it
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}"


class BlobWriter:
    """An open ingest: bytes written here become a blob when the ``ingest`` block exits cleanly."""

    def __init__(self, f: BinaryIO, tmp_path: Path) -> None:
        self._f = f
        self._hash = hashlib.sha256()
        self._size = 0
        self._digest: Digest | None = None
        self.tmp_path = tmp_path

    def write(self, b: bytes | bytearray | memoryview) -> int:
        """Append bytes to the blob; returns how many were written."""
        if self._digest is not None:
            raise StoreError("blob writer is already committed")
        self._f.write(b)
        self._hash.update(b)
        n = len(b)
        self._size += n
        return n

    def flush(self) -> None:
        """Push buffered bytes to the temp file (durability comes from the commit's fsync)."""
        self._f.flush()

    @property
    def size(self) -> int:
        """Bytes written so far (the blob's size once committed)."""
        return self._size

    @property
    def digest(self) -> Digest:
        """The committed blob's digest (only after the ``ingest`` block has exited cleanly)."""
        if self._digest is None:
            raise StoreError("blob writer is not committed yet")
        return self._digest

    def _current_digest(self) -> Digest:
        return sha256_digest(self._hash.hexdigest())


class BlobSource(Protocol):
    """Somewhere a missing blob can be fetched from into the store."""

    def can_fetch(self, d: Digest) -> bool: ...
    def fetch(self, d: Digest) -> bool: ...


class BlobStore:
    """Blobs named by sha256 under ``root/blobs/sha256``, with an ingest area in ``root/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._checked: set[Digest] = set()
        """Blobs whose bytes this process hashed (it wrote them, or ``check_out`` read them)."""
        self._stamps = self.root / "blobs" / "verified"
        """``check_out``'s stamps: ``<hex>`` holds the identity (device, inode, size, mtime)
        of the file that last hashed to that digest.  A write to a blob (or to a layout that
        hard-links it) moves its mtime on, so a blob whose identity still matches was not
        written since it was hashed.  Not noticed here: a write that sets the mtime back
        (whoever can do that can rewrite the stamps too) and damage below the file system
        (a disk's bit rot): ``cache verify`` re-hashes every blob for those."""

        self.fallback: BlobSource | None = None
        """Where a missing blob may still come from (a shared cache: ``RemoteCache``, which
        commits it through ``ingest``, verified): asked by ``ensure``, ``open`` and ``size``
        before they give up."""

    def ensure(self, d: Digest) -> bool:
        """Whether blob ``d`` is committed, fetching it through ``fallback`` if need be."""
        return self.has(d) or (self.fallback is not None and self.fallback.fetch(d))

    def available(self, d: Digest) -> bool:
        """Whether blob ``d`` is committed or ``fallback`` can fetch it (nothing is fetched)."""
        return self.has(d) or (self.fallback is not None and self.fallback.can_fetch(d))

    def path(self, d: Digest) -> Path:
        """Where blob ``d`` lives (whether or not it is present)."""
        try:
            return self._blobs / digest_hex(d)
        except ValueError as e:
            raise InvalidInput(f"not a sha256 digest: {d!r}") from e

    def has(self, d: Digest) -> bool:
        """Whether blob ``d`` is committed in the store."""
        return self.path(d).is_file()

    @contextlib.contextmanager
    def ingest(self, expected: Digest | None = None) -> Iterator[BlobWriter]:
        """Write a new blob: yields a writer; commits it when the block exits without error.

        On a clean exit the data is fsynced, its digest compared with ``expected``
        (``DigestMismatch``, nothing committed), and renamed into place read-only.  If the
        blob is already present the new copy is discarded: that is success, not an error.
        On any exception the temp file is removed.  After the block, ``writer.digest`` and
        ``writer.size`` describe the blob.
        """
        if expected is not None:
            self.path(expected)  # validates the digest before any work is done
        fd, tmp_name = tempfile.mkstemp(prefix=_INGEST_PREFIX, dir=self._tmp)
        tmp = Path(tmp_name)
        f = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        writer = BlobWriter(f, tmp)
        try:
            yield writer
            f.flush()
            os.fsync(f.fileno())
            f.close()
            actual = writer._current_digest()
            if expected is not None and actual != expected:
                raise DigestMismatch("blob", expected, actual)
            final = self.path(actual)
            if _same_size(final, writer.size):
                # Already committed by someone else: keep theirs (readers may hold it open).
                tmp.unlink(missing_ok=True)
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                _fsync_dir(self._blobs)
                self._checked.add(actual)  # hashed on the way in, by this process
            writer._digest = actual
        except BaseException:
            with contextlib.suppress(OSError):  # disk full: flushing the buffer fails again
                f.close()
            tmp.unlink(missing_ok=True)
            raise

    def put(self, data: bytes) -> Digest:
        """Store ``data`` and return its digest.  A blob the store already has is left as it
        is, as ``ingest`` leaves it, without writing and fsyncing a copy first (a build with
        an ``oci-layout://`` base put its config and manifest again each time: two fsyncs,
        ~3 ms, of planning)."""
        digest = sha256_digest(hashlib.sha256(data).hexdigest())
        if _same_size(self.path(digest), len(data)):
            return digest
        with self.ingest() as w:
            w.write(data)
        return w.digest

    def put_stream(self, src: BinaryIO, expected: Digest | None = None) -> Digest:
        """Copy a stream into the store (verified against ``expected`` when given)."""
        with self.ingest(expected) as w:
            while chunk := src.read(_CHUNK):
                w.write(chunk)
        return w.digest

    def open(self, d: Digest) -> BinaryIO:
        """Open blob ``d`` for reading (``NotFound`` if it is not in the store)."""
        try:
            return open(self.path(d), "rb")
        except FileNotFoundError as e:
            if self.fallback is not None and self.fallback.fetch(d):
                return open(self.path(d), "rb")
            raise NotFound(f"blob {d} is not in the store at {self.root}") from e

    def read(self, d: Digest) -> bytes:
        """Return the whole content of blob ``d`` (for small blobs: manifests, configs)."""
        with self.open(d) as f:
            return f.read()

    def size(self, d: Digest) -> int:
        """Size in bytes of blob ``d``."""
        try:
            return self.path(d).stat().st_size
        except FileNotFoundError as e:
            if self.fallback is not None and self.fallback.fetch(d):
                return self.path(d).stat().st_size
            raise NotFound(f"blob {d} is not in the store at {self.root}") from e

    def verify(self, d: Digest) -> bool:
        """Re-hash blob ``d``: True when its bytes still match its name."""
        with self.open(d) as f:
            return _sha256_of(f) == d

    def is_checked(self, d: Digest) -> bool:
        """Whether this process already hashed blob ``d`` (wrote it, or checked it out)."""
        return d in self._checked

    def check_out(self, d: Digest) -> None:
        """Verify blob ``d`` before it leaves the store (export, unpack): re-hash it unless
        this process already hashed it, or its verified stamp still matches the file.  A blob
        that no longer matches its name is removed and ``CorruptBlob`` raised, so what needs
        it is rebuilt instead of output."""
        if d in self._checked:
            return
        try:
            fd = os.open(self.path(d), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            fd = -1
        if fd < 0:  # not here (the fallback may fetch it, verified as it arrives), or odd
            # (a symlink): hashed through ``open`` as always, never stamped
            with self.open(d) as f:
                self.vouch(d, _sha256_of(f))
            return
        with os.fdopen(fd, "rb") as f:
            before = _identity(os.fstat(fd))
            if self._stamp_path(d).is_file() and self._read_stamp(d) == before:
                self._checked.add(d)
                return
            actual = _sha256_of(f)
            after = _identity(os.fstat(fd))
        self.vouch(d, actual)
        if before == after:
            self._write_stamp(d, after)

    def _stamp_path(self, d: Digest) -> Path:
        return self._stamps / digest_hex(d)

    def _read_stamp(self, d: Digest) -> str | None:
        try:
            return self._stamp_path(d).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def _write_stamp(self, d: Digest, identity: str) -> None:
        """Remember that the file ``identity`` names hashed to ``d``.  Only for a file last
        written (mtime) ``_RACY_S`` ago: the kernel's timestamps are coarse, so a write just
        after a recent one could keep its mtime (git's "racily clean" files)."""
        mtime_ns = int(identity.split()[-1])
        if mtime_ns > time.time_ns() - int(_RACY_S * 1e9):
            return
        with contextlib.suppress(OSError):
            self._stamps.mkdir(exist_ok=True)
            tmp = self._stamps / f".{digest_hex(d)}.{os.getpid()}.tmp"
            tmp.write_text(identity)
            os.replace(tmp, self._stamp_path(d))

    def vouch(self, d: Digest, actual: Digest) -> None:
        """Record what blob ``d`` hashed to while it was streamed out (``CorruptBlob`` and
        the blob removed when that is not ``d``)."""
        if actual != d:
            self.remove(d)
            raise CorruptBlob(d, actual)
        self._checked.add(d)

    def remove(self, d: Digest) -> None:
        """Delete blob ``d``; removing a blob that is not there is not an error."""
        self._checked.discard(d)
        self.path(d).unlink(missing_ok=True)
        self._stamp_path(d).unlink(missing_ok=True)

    def digests(self) -> Iterator[Digest]:
        """Every committed blob's digest, in no particular order."""
        with os.scandir(self._blobs) as it:
            for de in it:
                if len(de.name) == 64 and _HEX.issuperset(de.name) and de.is_file():
                    yield sha256_digest(de.name)

    def sweep_tmp(self, older_than_s: float = 3600) -> None:
        """Remove this store's abandoned ingest files not written to for ``older_than_s``.

        A live ingest's file has a recent mtime (its creation and every buffer's worth of
        writes, ``_WRITE_BUFFER`` bytes at most, update it), so this is safe while other
        builders are writing.
        """
        cutoff = time.time() - older_than_s
        with os.scandir(self._tmp) as it:
            for de in it:
                if not de.name.startswith(_INGEST_PREFIX):
                    continue
                try:
                    if de.is_file(follow_symlinks=False) and de.stat().st_mtime < cutoff:
                        os.unlink(de.path)
                except FileNotFoundError:
                    continue  # another sweeper or the committing writer got there first


def _same_size(p: Path, size: int) -> bool:
    """Whether ``p`` exists with ``size`` bytes (a committed blob with the same name)."""
    try:
        return p.stat().st_size == size
    except FileNotFoundError:
        return False


def _fsync_dir(d: Path) -> None:
    """fsync a directory so a rename into it survives a crash."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
