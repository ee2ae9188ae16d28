"""Deterministic layer tars: writing them from TOC entries, reading their TOC, (de)compressing.

A *layer* is an uncompressed tar stored in the ``BlobStore`` under its own sha256, which is
its OCI ``diff_id``: the blob named diff_id IS the tar, so a file in it can be read back by
offset (``open_member``).  Compressed forms (gzip, zstd) are separate blobs made from it
(``compress_layer``) or imported into it (``import_layer``).

The bytes of a written layer depend only on the entries given, never on the host: members
are sorted by path components (a directory before its contents, whiteouts before their
siblings), headers are ustar with empty user/group names, numeric ids, ``mtime`` taken from
the entry, no atime/ctime, and a PAX header only when ustar cannot say it (long or non-ASCII
names, big numbers, xattrs).  The archive ends with two zero blocks and no record padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import stat
import struct
import zlib
from collections.abc import Iterable
from typing import IO, BinaryIO, Protocol, cast

from blake3 import blake3

from cache.errors import InvalidInput, LbuildError, StoreError, Unsupported
from cache.store.blobs import BlobStore, BlobWriter
from cache.types import (
    MEDIA_TYPES,
    BlobInfo,
    Compression,
    Digest,
    Entry,
    EntryType,
    LayerInfo,
    sha256_digest,
)

TAR_WRITER_VERSION = 1
"""Version of the tar bytes ``write_layer`` makes of given entries (header layout, order, PAX
use): bump it when the encoding changes.  What entries a step produces is versioned by
``KEY_FORMAT`` in builder/plan/keys.py."""

GZIP_DEFAULT_LEVEL = 3
"""gzip is written by ISA-L's igzip (levels 0-3): level 3 compresses source trees within a few
per cent of zlib's level 6 at about ten times the speed, which is what an incremental
builder's edit loop pays for.  The output is ordinary gzip that every tool reads."""

ZSTD_DEFAULT_LEVEL = 3
"""zstd's own default level."""

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_CHUNK = 1 << 20
_OPAQUE = ".wh..wh..opq"
_WH = ".wh."
_PAX_NAME = b"././@PaxHeader"
_XATTR = "SCHILY.xattr."

_TYPEFLAGS: dict[str, bytes] = {
    "file": b"0",
    "hardlink": b"1",
    "symlink": b"2",
    "char": b"3",
    "block": b"4",
    "dir": b"5",
    "fifo": b"6",
    "whiteout": b"0",
    "opaque": b"0",
}

_SortKey = tuple[str, ...]
"""An entry's place in tar order: its path components, the whiteout/opaque markers encoded in
strings (see ``_sort_key``)."""

_BAD_COMPONENTS = frozenset(("", ".", ".."))
_HEADER_START = struct.Struct("100s48s8s1s100s")
"""A ustar header up to its magic: name, the mode/uid/gid/size/mtime fields, checksum,
typeflag, linkname (``s`` fields are NUL-padded)."""
_NUMBERS = b"%07o\0%07o\0%07o\0%011o\0%011o\0"
"""The mode, uid, gid, size and mtime fields (8, 8, 8, 12, 12 bytes) in one format."""
_MAGIC_AND_OWNERS = b"ustar\x0000" + bytes(64)
"""Magic, version, then empty uname/gname, so hosts' user databases never leak in."""
_PREFIX = bytes(167)
"""The prefix field (unused: PAX carries long names) and the block's padding."""
_ZERO_DEVS = b"%07o\0%07o\0" % (0, 0)
_BLANK_CHECKSUM_SUM = 8 * ord(" ") + sum(_MAGIC_AND_OWNERS)
"""What the checksum field (eight spaces while summing) and the magic add to a checksum."""
_MAX_OCTAL_8 = 8**7
_MAX_OCTAL_12 = 8**11


# ---------------------------------------------------------------------------------------------
# Writing


def write_layer(entries: Iterable[Entry], store: BlobStore) -> LayerInfo:
    """Write entries as a deterministic uncompressed layer tar into the store.

    Entries may come in any order.  Regular files' bytes are streamed from ``entry.source``
    and must be exactly ``entry.size`` long; their blake3 is computed on the way and fills
    ``digest`` when the caller left it empty (a different non-empty digest means the file
    changed).  Returns the layer's diff_id, tar size and TOC (entries in tar order, with the
    data ``offset`` of each regular file and ``source=None``).
    """
    planned = _plan(entries)
    toc: list[Entry] = []
    with _BlobFiles(store) as blobs, store.ingest() as w:
        for name, e in planned:
            header = _headers(name, e)
            if e.type != "file":
                w.write(header)
                toc.append(e)
                continue
            offset = w.size + len(header)
            digest = _copy_content(e, header, blobs, w)
            toc.append(
                Entry(
                    path=e.path,
                    type=e.type,
                    mode=e.mode,
                    uid=e.uid,
                    gid=e.gid,
                    size=e.size,
                    digest=digest,
                    link=e.link,
                    mtime=e.mtime,
                    devmajor=e.devmajor,
                    devminor=e.devminor,
                    xattrs=e.xattrs,
                    offset=offset,
                    source=None,
                )
            )
        w.write(_ZERO_BLOCK * 2)
    return LayerInfo(diff_id=w.digest, size=w.size, toc=tuple(toc))


def _split(path: str) -> tuple[str, ...]:
    """Validate an entry path and return its components (``"."`` is the root: no components)."""
    if path == ".":
        return ()
    comps = tuple(path.split("/"))
    if "\0" in path or not _BAD_COMPONENTS.isdisjoint(comps):
        raise InvalidInput(f"invalid path in layer entry: {path!r}")
    return comps


def _sort_key(e: Entry, comps: tuple[str, ...]) -> _SortKey:
    """Tar order: by components; in a directory the opaque marker, then whiteouts, then the rest.

    ``comps`` is ``_split(e.path)``.  The opaque marker is an extra ``""`` component and a
    whiteout's last component gets a ``"\\0"`` prefix: real components are never empty and
    never hold a NUL, so both sort before every real name in their directory (the marker
    first, whiteouts by name) and no two entries' keys collide unless they are the same.
    """
    if e.type == "opaque":
        return (*comps, "")
    if e.type == "whiteout":
        if not comps:
            raise InvalidInput("cannot white out the root directory")
        return (*comps[:-1], "\0" + comps[-1])
    return comps


def _member_name(e: Entry) -> str:
    """The tar member name of a checked entry (whiteouts become ``.wh.`` files, dirs end in /)."""
    if e.type == "dir":
        return "./" if e.path == "." else e.path + "/"
    if e.type == "opaque":
        return _OPAQUE if e.path == "." else f"{e.path}/{_OPAQUE}"
    if e.type == "whiteout":
        parent, _, name = e.path.rpartition("/")
        return f"{parent}/{_WH}{name}" if parent else _WH + name
    return e.path


def _normalize(e: Entry, comps: tuple[str, ...]) -> Entry:
    """Check an entry and clear the fields its type does not use, so TOCs compare equal.

    ``comps`` is ``_split(e.path)``.  An entry that is already normal (what the builder
    makes) is returned as it is.
    """
    if e.type not in _TYPEFLAGS:
        raise InvalidInput(f"unknown entry type {e.type!r} for {e.path}")
    if e.type in ("whiteout", "opaque"):
        return Entry(path=e.path, type=e.type, mode=0, mtime=e.mtime)
    if _WH in e.path and any(c.startswith(_WH) for c in comps):
        raise InvalidInput(f"{e.path}: names starting with {_WH!r} are reserved for whiteouts")
    if not comps and e.type != "dir":
        raise InvalidInput(f"the root of a layer must be a directory, not a {e.type}")
    if e.mode & ~0o7777 or e.mode < 0:
        raise InvalidInput(f"{e.path}: mode {e.mode:o} has bits beyond 0o7777 (file type bits?)")
    if e.uid < 0 or e.gid < 0:
        raise InvalidInput(f"{e.path}: negative uid/gid")
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if e.xattrs:
        names = [n for n, _ in e.xattrs]
        if len(set(names)) != len(names) or any(not n or "=" in n or "\0" in n for n in names):
            raise InvalidInput(f"{e.path}: invalid or duplicate xattr names {names!r}")
        xattrs = tuple(sorted(e.xattrs))
    keep_dev = e.type in ("char", "block")
    link = ""
    if e.type == "symlink":
        if not e.link or "\0" in e.link:
            raise InvalidInput(f"{e.path}: symlink without a valid target")
        link = e.link
    elif e.type == "hardlink":
        if not e.link or not _split(e.link):
            raise InvalidInput(f"{e.path}: hardlink without a valid target path")
        link = e.link
    if e.type == "file":
        if e.size < 0:
            raise InvalidInput(f"{e.path}: negative size")
        size, digest, source = e.size, e.digest, e.source
    else:
        size, digest, source = 0, "", None
    devmajor = e.devmajor if keep_dev else 0
    devminor = e.devminor if keep_dev else 0
    if (
        e.size == size
        and e.digest == digest
        and e.link == link
        and e.devmajor == devmajor
        and e.devminor == devminor
        and e.xattrs == xattrs
        and e.offset == -1
        and e.source is source
    ):
        return e
    return Entry(
        path=e.path,
        type=e.type,
        mode=e.mode,
        uid=e.uid,
        gid=e.gid,
        size=size,
        digest=digest,
        link=link,
        mtime=e.mtime,
        devmajor=devmajor,
        devminor=devminor,
        xattrs=xattrs,
        offset=-1,
        source=source,
    )


def _plan(entries: Iterable[Entry]) -> list[tuple[str, Entry]]:
    """Normalise, de-duplicate-check, fix hardlink heads and sort: (member name, entry) pairs."""
    by_key: dict[_SortKey, Entry] = {}
    for raw in entries:
        comps = _split(raw.path)
        e = _normalize(raw, comps)
        k = _sort_key(e, comps)
        if k in by_key:
            raise InvalidInput(f"duplicate layer entry for {e.path} ({e.type})")
        by_key[k] = e
    ordered = _fix_hardlinks(sorted(by_key.items()))
    return [(_member_name(e), e) for _, e in ordered]


def _fix_hardlinks(items: list[tuple[_SortKey, Entry]]) -> list[tuple[_SortKey, Entry]]:
    """Make the first path (in tar order) of each in-layer hardlink group the one with data.

    A tar hardlink must follow its target; the caller may have named any path of the group
    as the file, so the roles are reassigned: all names of one inode are equivalent.
    """
    entries = {e.path: e for _, e in items if e.type in ("file", "hardlink")}
    all_paths = {e.path for _, e in items if e.type not in ("whiteout", "opaque")}
    groups: dict[str, list[str]] = {}
    for _, e in items:
        if e.type != "hardlink":
            continue
        target, seen = e.link, {e.path}
        while target in entries and entries[target].type == "hardlink":
            if target in seen:
                raise InvalidInput(f"hardlink cycle through {e.path}")
            seen.add(target)
            target = entries[target].link
        if target in entries:
            groups.setdefault(target, []).append(e.path)
        elif target in all_paths:
            raise InvalidInput(f"hardlink {e.path} points to {target}, which is not a file")
    if not groups:
        return items
    keys = {e.path: k for k, e in items if e.type in ("file", "hardlink")}
    replaced: dict[str, Entry] = {}
    for target, links in groups.items():
        data = entries[target]
        head = min([target, *links], key=keys.__getitem__)
        replaced[head] = dataclasses.replace(data, path=head)
        for p in [target, *links]:
            if p != head:
                old = entries[p]
                replaced[p] = Entry(
                    path=p, type="hardlink", mode=old.mode, uid=old.uid, gid=old.gid,
                    link=head, mtime=old.mtime,
                )  # fmt: skip
    return [(k, replaced.get(e.path, e) if e.type in ("file", "hardlink") else e) for k, e in items]


def _headers(name: str, e: Entry) -> bytes:
    """The ustar header of one member, preceded by a PAX header when ustar cannot hold it."""
    pax: dict[str, bytes] = {}
    name_b = name.encode("utf-8", "surrogateescape")
    if len(name_b) > 100 or not name.isascii():
        pax["path"] = name_b
        name_b = name.encode("ascii", "replace")[:100]
    link_b = b""
    if e.link:
        link_b = e.link.encode("utf-8", "surrogateescape")
        if len(link_b) > 100 or not e.link.isascii():
            pax["linkpath"] = link_b
            link_b = e.link.encode("ascii", "replace")[:100]
    uid, gid, size, mtime = e.uid, e.gid, e.size, e.mtime
    if not (
        0 <= uid < _MAX_OCTAL_8
        and 0 <= gid < _MAX_OCTAL_8
        and 0 <= size < _MAX_OCTAL_12
        and 0 <= mtime < _MAX_OCTAL_12
    ):
        uid, gid, size, mtime = (
            _pax_number(pax, "uid", uid, _MAX_OCTAL_8),
            _pax_number(pax, "gid", gid, _MAX_OCTAL_8),
            _pax_number(pax, "size", size, _MAX_OCTAL_12),
            _pax_number(pax, "mtime", mtime, _MAX_OCTAL_12),
        )
    for xname, xvalue in e.xattrs:
        pax[_XATTR + xname] = xvalue
    devs = _ZERO_DEVS
    if e.devmajor or e.devminor:
        if not (0 <= e.devmajor < _MAX_OCTAL_8 and 0 <= e.devminor < _MAX_OCTAL_8):
            raise InvalidInput(f"{e.path}: device numbers too large")
        devs = b"%07o\0%07o\0" % (e.devmajor, e.devminor)
    numbers = _NUMBERS % (e.mode, uid, gid, size, mtime)
    header = _ustar(name_b, numbers, _TYPEFLAGS[e.type], link_b, devs)
    if not pax:
        return header
    records = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    pax_numbers = _NUMBERS % (0o644, 0, 0, len(records), 0)
    pax_header = _ustar(_PAX_NAME, pax_numbers, b"x", b"", _ZERO_DEVS)
    return pax_header + records + bytes(-len(records) % _BLOCK) + header


def _pax_number(pax: dict[str, bytes], key: str, value: int, limit: int) -> int:
    """``value`` when its octal field holds it, else 0 with the number put in ``pax[key]``."""
    if 0 <= value < limit:
        return value
    pax[key] = str(value).encode()
    return 0


def _ustar(name: bytes, numbers: bytes, typeflag: bytes, linkname: bytes, devs: bytes) -> bytes:
    """One 512-byte ustar header block with its checksum filled in.

    ``numbers`` holds the mode, uid, gid, size and mtime fields (``_NUMBERS``), ``devs`` the
    devmajor and devminor fields.  The checksum is the sum of the block's bytes with the
    checksum field as eight spaces; NUL padding adds nothing, so it is summed from the parts.
    """
    assert len(name) <= 100 and len(linkname) <= 100 and len(numbers) == 48 and len(devs) == 16
    checksum = (
        sum(name) + sum(numbers) + typeflag[0] + sum(linkname) + sum(devs) + _BLANK_CHECKSUM_SUM
    )
    start = _HEADER_START.pack(name, numbers, b"%06o\0 " % checksum, typeflag, linkname)
    return start + _MAGIC_AND_OWNERS + devs + _PREFIX


def _pax_record(key: str, value: bytes) -> bytes:
    """One ``"<len> key=value\\n"`` PAX record (the length counts its own digits)."""
    body = b" " + key.encode("utf-8") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


_MAX_OPEN_BLOBS = 16
"""Blobs ``_BlobFiles`` keeps open at once while one layer is written."""


class _BlobFiles:
    """The content-store blobs a layer's files are copied from, each opened once per layer.

    A ``COPY --from`` of a directory reads thousands of files from one or a few lower layer
    blobs; at most ``_MAX_OPEN_BLOBS`` stay open (the oldest opened is closed first).
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._files: dict[Digest, BinaryIO] = {}

    def __enter__(self) -> _BlobFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def open(self, blob: Digest) -> BinaryIO:
        """The open blob (shared: callers seek it before reading)."""
        f = self._files.get(blob)
        if f is None:
            if len(self._files) >= _MAX_OPEN_BLOBS:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[blob] = self._store.open(blob)
        return f

    def read(self, blob: Digest, offset: int, size: int) -> bytes | None:
        """``size`` bytes of ``blob`` from ``offset``; None if the blob ends before them."""
        fd = self.open(blob).fileno()
        data = os.pread(fd, size, offset)
        while len(data) < size:
            more = os.pread(fd, size - len(data), offset + len(data))
            if not more:
                return None
            data += more
        return data


def _copy_content(e: Entry, header: bytes, blobs: _BlobFiles, w: BlobWriter) -> str:
    """Write a regular file's member (header, bytes from ``entry.source``, padding) to the
    tar; return the blake3 hex of the bytes.

    Content of at most ``_CHUNK`` bytes is read whole and written with its header and padding
    in one write; bigger files are streamed through a buffer.
    """
    src = e.source
    padding = _ZERO_BLOCK[: -e.size % _BLOCK]
    data: bytes | None
    if src is None or (src.host_path is None and src.blob is None and src.data is None):
        if e.size:
            raise InvalidInput(f"{e.path}: no content source for a {e.size}-byte file")
        data = b""
    elif src.data is not None:
        if len(src.data) != e.size:
            raise InvalidInput(
                f"{e.path}: inline data is {len(src.data)} bytes, entry says {e.size}"
            )
        data = src.data
    elif e.size > _CHUNK:
        return _stream_content(e, header, padding, blobs, w)
    elif src.host_path is not None:
        data = _read_host_file(src.host_path, e.size)
        if data is None:
            raise LbuildError(f"file changed while being read: {src.host_path}")
    else:
        assert src.blob is not None
        data = blobs.read(src.blob, src.offset, e.size)
        if data is None:
            raise StoreError(f"blob {src.blob} ends before {e.path}'s data does")
    digest = _check_digest(e, blake3(data).hexdigest())
    w.write(b"".join((header, data, padding)))
    return digest


def _stream_content(
    e: Entry, header: bytes, padding: bytes, blobs: _BlobFiles, w: BlobWriter
) -> str:
    """``_copy_content`` for a file bigger than ``_CHUNK``, from a host file or a blob."""
    src = e.source
    assert src is not None
    h = blake3()
    w.write(header)
    if src.host_path is not None:
        with _open_host_file(src.host_path) as f:
            if _copy_exact(f, e.size, w, h) or f.read(1):
                raise LbuildError(f"file changed while being read: {src.host_path}")
    else:
        assert src.blob is not None
        blob = blobs.open(src.blob)
        blob.seek(src.offset)
        if _copy_exact(blob, e.size, w, h):
            raise StoreError(f"blob {src.blob} ends before {e.path}'s data does")
    w.write(padding)
    return _check_digest(e, h.hexdigest())


def _check_digest(e: Entry, digest: str) -> str:
    """The content digest, checked against the entry's when the caller gave one."""
    if e.digest and e.digest != digest:
        raise LbuildError(f"file changed while being read: {e.path} (content digest differs)")
    return digest


def _open_host_file(path: str) -> BinaryIO:
    """Open a host (context) file for a layer: never through a symlink in its last component
    (one swapped in since the walk would leak what it points at), never hanging on a fifo.

    The caller compares what it reads with the entry's content digest, taken from the walk's
    own file, so a parent directory swapped for a symlink is caught there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            raise LbuildError(f"file changed while being read: {path}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LbuildError(f"file changed while being read: {path} (not a regular file)")
    return os.fdopen(fd, "rb", buffering=0)


def _read_host_file(path: str, size: int) -> bytes | None:
    """The whole content of a host file that should be ``size`` bytes; None if it is not.

    Asks for one byte more than expected, then reads on (a read may return less than asked)
    until the end of the file or that extra byte: a file that grew is seen, as one that shrank.
    """
    with _open_host_file(path) as f:
        data = f.read(size + 1)
        while len(data) <= size:
            more = f.read(size + 1 - len(data))
            if not more:
                break
            data += more
    return data if len(data) == size else None


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...


def _copy_exact(f: BinaryIO, size: int, w: BlobWriter, h: _Hasher) -> bool:
    """Copy ``size`` bytes from f to w through h; True if f ended early."""
    buf = bytearray(min(_CHUNK, max(size, 1)))
    view = memoryview(buf)
    remaining = size
    while remaining:
        n = f.readinto(view[: min(remaining, len(buf))])  # type: ignore[attr-defined]
        if not n:
            return True
        w.write(view[:n])
        h.update(view[:n])
        remaining -= n
    return False


# ---------------------------------------------------------------------------------------------
# Reading


class _Input:
    """A forward-only reader that counts its position (works on pipes and decompressors)."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.pos = 0

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes; fewer only at end of stream."""
        data = self._src.read(n) if n > 0 else b""
        if 0 < len(data) < n:  # a short read (pipes, decompressors): read on
            parts = [data]
            want = n - len(data)
            while want > 0:
                b = self._src.read(want)
                if not b:
                    break
                parts.append(b)
                want -= len(b)
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def pad(self, n: int) -> None:
        """Consume up to ``n`` padding bytes; a tar that ends right after its last member's data
        (umoci 0.4.7 writes such) is accepted, as Go's archive/tar does."""
        while n > 0:
            b = self.read(min(n, _CHUNK))
            if not b:
                return
            n -= len(b)

    def feed(self, n: int, h: _Hasher | None, where: str) -> None:
        """Consume exactly ``n`` bytes, hashing them into h if given."""
        while n > 0:
            b = self.read(min(n, _CHUNK))
            if not b:
                raise InvalidInput(f"truncated layer tar: {where} ends early at offset {self.pos}")
            if h is not None:
                h.update(b)
            n -= len(b)


def read_toc(stream: BinaryIO) -> tuple[Entry, ...]:
    """The TOC of an uncompressed layer tar, in tar order, with each file's data offset.

    Whiteout members become ``whiteout``/``opaque`` entries; file contents are hashed with
    blake3 into ``digest``.  The stream is read forward only (a pipe is fine).
    """
    return _scan(_Input(stream))


_MAX_META = 1 << 20
"""Largest PAX or GNU long-name/long-link header data read (Go's archive/tar: 1 MiB)."""


def _scan(src: _Input) -> tuple[Entry, ...]:
    entries: list[Entry] = []
    global_pax: dict[str, bytes] = {}
    pax: dict[str, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    while True:
        start = src.pos
        hdr = src.read(_BLOCK)
        if not hdr or hdr == _ZERO_BLOCK:
            break  # end of archive (a missing end marker is tolerated, as Go's reader does)
        if len(hdr) < _BLOCK:
            raise InvalidInput(f"truncated layer tar: partial header at offset {start}")
        _check_sum(hdr, start)
        typeflag = hdr[156:157]
        size = _number(hdr[124:136], start)
        if typeflag in (b"x", b"g", b"L", b"K"):
            if not 0 <= size <= _MAX_META:  # as Go's archive/tar: never slurp a huge header
                raise InvalidInput(
                    f"layer tar: {size}-byte extended header at offset {start} (the limit is "
                    f"{_MAX_META} bytes)"
                )
            data = src.read(size)
            if len(data) < size:
                raise InvalidInput(f"truncated layer tar: header data at offset {start}")
            src.feed(-size % _BLOCK, None, "padding")
            if typeflag == b"x":
                pax = _parse_pax(data, start)
            elif typeflag == b"g":
                global_pax.update(_parse_pax(data, start))
            elif typeflag == b"L":
                long_name = data.split(b"\0", 1)[0]
            else:
                long_link = data.split(b"\0", 1)[0]
            continue
        fields = {**global_pax, **pax} if global_pax or pax else _NO_FIELDS
        pax = {}
        name_b = fields.get("path") or long_name or _ustar_name(hdr)
        link_b = fields.get("linkpath") or long_link or _cstr(hdr[157:257])
        long_name = long_link = None
        if typeflag == b"S" or (fields and any(k.startswith("GNU.sparse.") for k in fields)):
            raise Unsupported(f"sparse files in layer tars are not supported (at offset {start})")
        if "size" in fields:
            size = _pax_int(fields["size"], start)
        uid = _pax_int(fields["uid"], start) if "uid" in fields else _number(hdr[108:116], start)
        gid = _pax_int(fields["gid"], start) if "gid" in fields else _number(hdr[116:124], start)
        mtime = (
            _pax_int(fields["mtime"], start) if "mtime" in fields else _number(hdr[136:148], start)
        )
        mode = _number(hdr[100:108], start) & 0o7777
        name = name_b.decode("utf-8", "surrogateescape")
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if fields:
            xattrs = tuple(
                sorted((k[len(_XATTR) :], v) for k, v in fields.items() if k.startswith(_XATTR))
            )
        kind = _KINDS.get(typeflag)
        if kind is None:
            raise Unsupported(f"unsupported tar member type {typeflag!r} for {name!r}")
        if kind == "file" and name.endswith("/"):
            kind = "dir"  # pre-POSIX tars mark directories only by the trailing slash
        path = _clean_path(name)
        comps = path.split("/")
        if comps[-1].startswith(_WH):
            src.feed(size + (-size % _BLOCK) if kind == "file" else 0, None, name)
            parent = "/".join(comps[:-1]) or "."
            if comps[-1] == _OPAQUE:
                entries.append(Entry(path=parent, type="opaque", mode=0, mtime=mtime))
            elif not comps[-1].startswith(_WH + _WH) and len(comps[-1]) > len(_WH):
                hidden = comps[-1][len(_WH) :]
                wpath = hidden if parent == "." else f"{parent}/{hidden}"
                entries.append(Entry(path=wpath, type="whiteout", mode=0, mtime=mtime))
            continue  # other ".wh..wh." names are aufs bookkeeping: not content
        digest, offset, link, major, minor = "", -1, "", 0, 0
        if kind == "file":
            offset = src.pos
            digest = _read_data(src, size, name)
        else:
            size = 0
            if kind in ("char", "block"):
                major, minor = _number(hdr[329:337], start), _number(hdr[337:345], start)
            elif kind == "symlink":
                link = link_b.decode("utf-8", "surrogateescape")
                if not link:  # Linux has no such thing: nothing could extract it
                    raise InvalidInput(f"layer tar: symlink {name} has an empty target")
            elif kind == "hardlink":
                link = _clean_path(link_b.decode("utf-8", "surrogateescape"))
        entries.append(
            Entry(
                path=path,
                type=kind,
                mode=mode,
                uid=uid,
                gid=gid,
                size=size,
                digest=digest,
                link=link,
                mtime=mtime,
                devmajor=major,
                devminor=minor,
                xattrs=xattrs,
                offset=offset,
            )
        )
    return tuple(entries)


_NO_FIELDS: dict[str, bytes] = {}
"""The PAX fields of a member that has none (never modified)."""


def _read_data(src: _Input, size: int, name: str) -> str:
    """Consume a regular file's data and padding; return the data's blake3 hex."""
    padding = -size % _BLOCK
    if size >= 0 and size + padding <= _CHUNK:  # the usual small file: one read
        data = src.read(size + padding)
        if len(data) < size:
            raise InvalidInput(f"truncated layer tar: {name} ends early at offset {src.pos}")
        h = blake3(memoryview(data)[:size])
    else:
        h = blake3()
        src.feed(size, h, name)
        src.pad(padding)
    digest: str = h.hexdigest()
    return digest


_KINDS: dict[bytes, EntryType] = {
    b"0": "file",
    b"\0": "file",
    b"7": "file",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "char",
    b"4": "block",
    b"5": "dir",
    b"6": "fifo",
}


def _clean_path(name: str) -> str:
    """A member name as an entry path: relative, no ``./`` or trailing ``/``; ``.`` is the root."""
    comps = [c for c in name.split("/") if c not in ("", ".")]
    if ".." in comps:
        raise InvalidInput(f"unsafe path in layer tar: {name!r}")
    return "/".join(comps) or "."


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _ustar_name(hdr: bytes) -> bytes:
    name = _cstr(hdr[0:100])
    if hdr[257:263] == b"ustar\x00":  # POSIX ustar (GNU's magic is "ustar  ": no prefix field)
        prefix = _cstr(hdr[345:500])
        if prefix:
            return prefix + b"/" + name
    return name


def _number(field: bytes, at: int) -> int:
    """A numeric header field: octal, or GNU base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            return int.from_bytes(field, "big", signed=True)
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = _cstr(field).strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise InvalidInput(f"invalid tar header at offset {at}: bad number {field!r}") from None


def _pax_int(value: bytes, at: int) -> int:
    """An integer PAX value; fractional times are truncated toward minus infinity."""
    try:
        whole, _, _frac = value.decode("ascii").partition(".")
        n = int(whole)
        if value.startswith(b"-") and _frac.strip("0"):
            n -= 1
        return n
    except ValueError:
        raise InvalidInput(f"invalid PAX number {value!r} at offset {at}") from None


def _check_sum(hdr: bytes, at: int) -> None:
    stored = _number(hdr[148:156], at)
    unsigned = sum(hdr[:148]) + 8 * 0x20 + sum(hdr[156:])
    if stored == unsigned:
        return  # the usual case: no need for the signed sum (old tars with high bytes)
    signed = unsigned - 256 * sum(1 for b in hdr[:148] + hdr[156:] if b >= 0x80)
    if stored not in (unsigned, signed):
        raise InvalidInput(f"invalid tar header at offset {at}: checksum mismatch")


def _parse_pax(data: bytes, at: int) -> dict[str, bytes]:
    """Parse ``"<len> key=value\\n"`` records."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        try:
            n = int(data[pos:sp])
        except ValueError:
            raise InvalidInput(f"invalid PAX header at offset {at}") from None
        rec = data[sp + 1 : pos + n]
        if n <= 0 or not rec.endswith(b"\n") or b"=" not in rec:
            raise InvalidInput(f"invalid PAX record at offset {at}")
        key, _, value = rec[:-1].partition(b"=")
        k = key.decode("utf-8", "surrogateescape")
        if value:
            out[k] = value
        else:
            out.pop(k, None)  # an empty value deletes the keyword
        pos += n
    return out


# ---------------------------------------------------------------------------------------------
# Import, compression, random access


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


def import_layer(store: BlobStore, compressed: BinaryIO, media_type: str) -> LayerInfo:
    """Decompress a layer blob into the store as an uncompressed tar; return its diff_id and TOC.

    ``media_type`` is an OCI or Docker layer type, or ``"auto"`` to recognise gzip, zstd,
    bzip2, xz or a plain tar by their first bytes (what ``ADD`` of a local archive needs).
    One pass: the decompressed bytes are hashed, stored and parsed as they stream by.
    """
    import lzma

    import zstandard

    src: BinaryIO = compressed
    if media_type == "auto":
        head = compressed.read(6)
        codec: str = next((c for magic, c in _MAGIC if head.startswith(magic)), "none")
        src = cast(BinaryIO, _Prefixed(head, compressed))
    else:
        codec = codec_of(media_type)
    bad = (OSError, EOFError, zlib.error, zstandard.ZstdError, lzma.LZMAError)
    try:
        with contextlib.ExitStack() as stack:
            plain = _decompressed(stack, src, codec)
            w = stack.enter_context(store.ingest())
            tee = _Tee(plain, w)
            toc = _scan(_Input(cast(BinaryIO, tee)))
            while tee.read(_CHUNK):
                pass  # keep the end-of-archive blocks and padding: diff_id covers all bytes
    except bad as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk is full (a decompression bomb, or just a big layer): not bad input
        raise InvalidInput(f"layer is not a valid {codec} stream: {e}") from e
    return LayerInfo(diff_id=w.digest, size=w.size, toc=toc)


def compress_layer(
    store: BlobStore, diff_id: Digest, codec: Compression, level: int | None = None
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


def open_member(store: BlobStore, diff_id: Digest, entry: Entry) -> BinaryIO:
    """Open a regular file's bytes inside a stored layer tar, by its TOC offset and size."""
    if entry.type != "file" or entry.offset < 0:
        raise InvalidInput(f"{entry.path}: not a regular file with a known offset in {diff_id}")
    f = store.open(diff_id)
    return io.BufferedReader(_Section(f, entry.offset, entry.size, entry.path))
