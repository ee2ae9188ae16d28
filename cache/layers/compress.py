"""Layer codecs: gzip (ISA-L igzip) and zstd; importing a compressed layer into the store as
an uncompressed tar (one pass: decompress, hash, store, read its TOC), compressing a stored tar,
and reading one member of a stored tar by offset.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import zlib
from typing import IO, BinaryIO, Protocol, cast

from cache.errors import InvalidInput, StoreError, Unsupported
from cache.layers.tarfmt import (
    _CHUNK,
    GZIP_DEFAULT_LEVEL,
    ZSTD_DEFAULT_LEVEL,
)
from cache.layers.tarread import TarInput, _scan
from cache.store.blobs import BlobWriter
from cache.store.contract import ContentStore
from cache.types import (
    MEDIA_TYPES,
    BlobInfo,
    Compression,
    Digest,
    Entry,
    LayerInfo,
    sha256_digest,
)


def codec_of(media_type: str) -> Compression:
    """The compression of a layer media type (OCI or Docker)."""
    if media_type.endswith(("+gzip", ".tar.gzip")):
        return "gzip"
    if media_type.endswith(("+zstd", ".tar.zstd")):
        return "zstd"
    if media_type.endswith((".tar", "diff.tar")):
        return "none"
    raise Unsupported(f"unsupported layer media type {media_type!r}")


def codec_version(codec: Compression) -> str:
    """The version of the library behind a codec (part of a compressed blob's cache key)."""
    if codec == "gzip":
        import isal

        return f"isal-{isal.__version__}"
    if codec == "zstd":
        import zstandard

        return f"zstd-{zstandard.ZSTD_VERSION}"
    return "none"


class _Tee:
    """Reads from a stream and writes every byte read into a blob writer."""

    def __init__(self, src: _Readable, w: BlobWriter) -> None:
        self._src = src
        self._w = w

    def read(self, n: int = -1) -> bytes:
        b = self._src.read(n)
        self._w.write(b)
        return b


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Prefixed:
    """A stream with some already-read bytes put back in front of it."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._rest.read(n)
        if n < 0:
            out, self._head = self._head + self._rest.read(), b""
            return out
        out, self._head = self._head[:n], self._head[n:]
        return out

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def _decompressed(stack: contextlib.ExitStack, src: BinaryIO, codec: str) -> _Readable:
    """The uncompressed stream of ``src`` (nothing is closed that the caller owns)."""
    if codec == "gzip":
        from isal import igzip

        return stack.enter_context(igzip.GzipFile(fileobj=src, mode="rb"))  # type: ignore[no-untyped-call]
    if codec == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_across_frames=True, closefd=False
        )
        return cast(_Readable, stack.enter_context(reader))
    if codec == "bzip2":
        import bz2

        return stack.enter_context(bz2.BZ2File(src, mode="rb"))
    if codec == "xz":
        import lzma

        return stack.enter_context(lzma.LZMAFile(src, mode="rb"))
    return src


def decode_errors() -> tuple[type[Exception], ...]:
    """What the decompressors raise for bytes that are no valid stream of their codec (ISA-L's
    ``IsalError`` is not an OSError; zstandard and lzma have their own)."""
    import lzma

    import zstandard
    from isal import igzip_lib

    isal_error = cast("type[Exception]", igzip_lib.IsalError)
    return (OSError, EOFError, zlib.error, isal_error, zstandard.ZstdError, lzma.LZMAError)


def import_layer(store: ContentStore, compressed: BinaryIO, media_type: str) -> LayerInfo:
    """Decompress a layer blob into the store as an uncompressed tar; return its diff_id and TOC.

    ``media_type`` is an OCI or Docker layer type, or ``"auto"`` to recognise gzip, zstd,
    bzip2, xz or a plain tar by their first bytes (what ``ADD`` of a local archive needs).
    One pass: the decompressed bytes are hashed, stored and parsed as they stream by.
    """
    src: BinaryIO = compressed
    if media_type == "auto":
        head = compressed.read(6)
        codec: str = next((c for magic, c in _MAGIC if head.startswith(magic)), "none")
        src = cast(BinaryIO, _Prefixed(head, compressed))
    else:
        codec = codec_of(media_type)
    bad = decode_errors()
    try:
        with contextlib.ExitStack() as stack:
            plain = _decompressed(stack, src, codec)
            w = stack.enter_context(store.ingest())
            tee = _Tee(plain, w)
            toc = _scan(TarInput(cast(BinaryIO, tee)))
            while tee.read(_CHUNK):
                pass  # keep the end-of-archive blocks and padding: diff_id covers all bytes
    except bad as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk is full (a decompression bomb, or just a big layer): not bad input
        raise InvalidInput(f"layer is not a valid {codec} stream: {e}") from e
    return LayerInfo(diff_id=w.digest, size=w.size, toc=toc)


def compress_layer(
    store: ContentStore, diff_id: Digest, codec: Compression, level: int | None = None
) -> BlobInfo:
    """Compress a stored layer tar deterministically; returns the compressed blob.

    gzip headers carry no name, mtime 0 and OS byte 255 (default level 6); zstd frames are
    single-threaded with content size and checksum (default level 3).  ``"none"`` returns the
    diff_id blob itself.  Same input, codec, level and library version give the same bytes.
    """
    if codec == "none":
        return BlobInfo(digest=diff_id, size=store.size(diff_id), media_type=MEDIA_TYPES["none"])
    if codec == "gzip":
        from isal import igzip

        lvl = GZIP_DEFAULT_LEVEL if level is None else level
        if not 0 <= lvl <= 3:
            raise InvalidInput(f"gzip (igzip) level must be 0..3, not {lvl}")
        with (
            store.open(diff_id) as src,
            store.ingest() as w,
            igzip.GzipFile(filename="", mode="wb", compresslevel=lvl, fileobj=w, mtime=0) as gz,  # type: ignore[no-untyped-call]
        ):
            h = None if store.is_checked(diff_id) else hashlib.sha256()
            while chunk := src.read(_CHUNK):
                if h is not None:
                    h.update(chunk)
                gz.write(chunk)  # type: ignore[no-untyped-call]
            if h is not None:  # never compress a corrupt tar
                store.vouch(diff_id, sha256_digest(h.hexdigest()))
    elif codec == "zstd":
        import zstandard

        lvl = ZSTD_DEFAULT_LEVEL if level is None else level
        if not -(1 << 17) <= lvl <= 22:
            raise InvalidInput(f"zstd level must be at most 22, not {lvl}")
        size = store.size(diff_id)
        cctx = zstandard.ZstdCompressor(level=lvl, write_checksum=True, write_content_size=True)
        with (
            store.open(diff_id) as src,
            store.ingest() as w,
            cctx.stream_writer(cast(IO[bytes], w), size=size, closefd=False) as zw,
        ):
            h = None if store.is_checked(diff_id) else hashlib.sha256()
            while chunk := src.read(_CHUNK):
                if h is not None:
                    h.update(chunk)
                zw.write(chunk)
            if h is not None:  # never compress a corrupt tar
                store.vouch(diff_id, sha256_digest(h.hexdigest()))
    else:
        raise Unsupported(f"unsupported compression {codec!r}")
    return BlobInfo(digest=w.digest, size=w.size, media_type=MEDIA_TYPES[codec])


class _Section(io.RawIOBase):
    """A read-only window [offset, offset+size) of an open file, read with pread."""

    def __init__(self, f: BinaryIO, offset: int, size: int, what: str) -> None:
        self._f = f
        self._offset = offset
        self._size = size
        self._pos = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._f.fileno(), n, self._offset + self._pos)
        if not data:
            raise StoreError(f"{self._what}: layer blob is shorter than its TOC says")
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()
        super().close()


def open_member(store: ContentStore, diff_id: Digest, entry: Entry) -> BinaryIO:
    """Open a regular file's bytes inside a stored layer tar, by its TOC offset and size."""
    if entry.type != "file" or entry.offset < 0:
        raise InvalidInput(f"{entry.path}: not a regular file with a known offset in {diff_id}")
    f = store.open(diff_id)
    return io.BufferedReader(_Section(f, entry.offset, entry.size, entry.path))
