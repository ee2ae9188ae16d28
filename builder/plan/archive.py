"""ADD of a local archive, as Docker does it.

:func:`is_archive` is Docker's test (``IsArchivePath`` in moby's pkg/archive, used by
BuildKit's file backend): the file's content is decompressed by its magic bytes (gzip, bzip2,
xz, zstd, or none) and the result must begin with a tar header whose checksum is right.  The
file name plays no part: a ``.gz`` that is not a tar is copied as it is, a tar called
``data.bin`` is extracted.

:func:`archive_items` turns the archive's table of contents into the items ADD writes under
its destination.  BuildKit extracts with ``chrootarchive.Untar(file, dest)``: the extraction
runs chrooted at the destination, each member replaces what is at its path (a directory over
a directory merges, keeping the later member's metadata), ``.`` is skipped when it exists
(the destination keeps its own metadata), and a path through a symlink an earlier member made
follows it inside that root.  A member whose path goes through a file an earlier member made
fails, naming the member, as the extraction does (ENOTDIR).
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from cache.errors import InvalidInput
from cache.types import ContentRef, Digest, Entry

__all__ = ["archive_items", "is_archive"]

_BLOCK = 512
_CODECS = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_MAX_LINKS = 255  # symlinks followed while resolving one member (Linux stops at 40; any bound)


def _octal(field: bytes) -> int | None:
    """A numeric tar header field (octal with NULs/spaces, or base-256), None when malformed."""
    if field and field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _is_tar_header(block: bytes) -> bool:
    """What Go's ``tar.Reader.Next`` needs of a first block: a checksum that matches."""
    if len(block) < _BLOCK or block == bytes(_BLOCK):
        return False
    stored = _octal(block[148:156])
    if stored is None:
        return False
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for b in rest if b >= 0x80)
    if stored not in (unsigned, signed):
        return False
    return _octal(block[124:136]) is not None  # the size must parse too


def _head(f: BinaryIO, codec: str) -> bytes:
    """The first block of the decompressed stream (short or b"" when it is not readable)."""
    with contextlib.ExitStack() as stack:
        src: Any = f  # a file or one of the decompressors: each has read()
        if codec == "gzip":
            import gzip

            src = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        elif codec == "bzip2":
            import bz2

            src = stack.enter_context(bz2.BZ2File(f, mode="rb"))
        elif codec == "xz":
            import lzma

            src = stack.enter_context(lzma.LZMAFile(f, mode="rb"))
        elif codec == "zstd":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(
                f, read_across_frames=True, closefd=False
            )
            src = stack.enter_context(reader)
        data = b""
        while len(data) < _BLOCK:
            more = src.read(_BLOCK - len(data))
            if not more:
                break
            data += more
        return data


def is_archive(path: str | Path) -> bool:
    """Docker's ADD test: a (possibly gzip/bzip2/xz/zstd-compressed) tar, by content only."""
    import lzma
    import zlib

    import zstandard

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            codec = next((c for m, c in _CODECS if magic.startswith(m)), "none")
            head = _head(f, codec)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError):
        return False
    return _is_tar_header(head)


def _resolve(
    path: str, made: dict[str, Entry], what: str, file: str | None, line: int | None
) -> str:
    """Resolve a member's parent directories among what earlier members made (root = dest)."""
    comps = path.split("/")
    pending = comps[:-1]
    out: list[str] = []
    hops = 0
    while pending:
        c = pending.pop(0)
        if c in ("", "."):
            continue
        if c == "..":
            if out:
                out.pop()
            continue
        cur = "/".join([*out, c])
        e = made.get(cur)
        if e is not None and e.type == "symlink":
            hops += 1
            if hops > _MAX_LINKS:
                raise InvalidInput(
                    f"ADD {what}: archive entry {path!r}: too many levels of symbolic links",
                    file=file,
                    line=line,
                )
            if e.link.startswith("/"):
                out = []
            pending = e.link.split("/") + pending
            continue
        if e is not None and e.type != "dir":
            raise InvalidInput(
                f"ADD {what}: archive entry {path!r} goes through {cur!r}, "
                "which an earlier entry made a file, not a directory",
                file=file,
                line=line,
            )
        out.append(c)
    return "/".join([*out, comps[-1]])


def archive_items(
    toc: Iterable[Entry],
    diff_id: Digest,
    what: str,
    *,
    file: str | None = None,
    line: int | None = None,
) -> list[tuple[str, Entry]]:
    """The (path below the destination, entry) pairs an archive's members extract to.

    ``toc`` is the archive's table of contents in tar order (``diff_id`` names the stored
    uncompressed tar the file entries point into).  Whiteout names are not special in an
    archive Docker extracts, but the layer reader has already turned them into whiteout
    entries; they are left out, as before.
    """
    made: dict[str, Entry] = {}
    for e in toc:
        if e.type in ("whiteout", "opaque"):
            continue
        if e.path in (".", ""):
            continue  # the destination keeps its own metadata (Docker skips ".")
        rel = _resolve(e.path, made, what, file, line)
        if rel in (".", "") or rel.endswith("/.."):
            continue
        old = made.get(rel)
        if old is not None and old.type == "dir" and e.type != "dir":
            prefix = rel + "/"
            for key in [k for k in made if k.startswith(prefix)]:
                del made[key]
        ne = replace(e, path=rel)
        if e.type == "file":
            ne = replace(ne, source=ContentRef(blob=diff_id, offset=e.offset))
        elif e.type == "hardlink":
            target = posixpath.normpath(e.link).lstrip("/")
            resolved = _resolve(target, made, what, file, line)
            if made.get(resolved) is None:
                raise InvalidInput(
                    f"ADD {what}: archive entry {e.path!r} is a hard link to {e.link!r}, "
                    "which no earlier entry made",
                    file=file,
                    line=line,
                )
            ne = replace(ne, link=resolved)
        made.pop(rel, None)  # a replaced member moves to where the later one stands
        made[rel] = ne
    return list(made.items())
