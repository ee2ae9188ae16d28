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

import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from blake3 import blake3

from cache.errors import InvalidInput, LbuildError, StoreError
from cache.layers.compress import (  # re-exported: the layer API in one place
    codec_of,
    codec_version,
    compress_layer,
    import_layer,
    open_member,
)
from cache.layers.tarfmt import (
    _BAD_COMPONENTS,
    _BLANK_CHECKSUM_SUM,
    _BLOCK,
    _CHUNK,
    _HEADER_START,
    _MAGIC_AND_OWNERS,
    _MAX_OCTAL_8,
    _MAX_OCTAL_12,
    _NUMBERS,
    _OPAQUE,
    _PAX_NAME,
    _PREFIX,
    _TYPEFLAGS,
    _WH,
    _XATTR,
    _ZERO_BLOCK,
    _ZERO_DEVS,
    GZIP_DEFAULT_LEVEL,
    TAR_WRITER_VERSION,
    ZSTD_DEFAULT_LEVEL,
    _Hasher,
    _SortKey,
)
from cache.layers.tarread import read_toc
from cache.store.blobs import BlobWriter
from cache.store.contract import ContentStore
from cache.types import (
    Digest,
    Entry,
    LayerInfo,
)

__all__ = [
    "GZIP_DEFAULT_LEVEL",
    "TAR_WRITER_VERSION",
    "ZSTD_DEFAULT_LEVEL",
    "codec_of",
    "codec_version",
    "compress_layer",
    "import_layer",
    "open_member",
    "read_toc",
    "write_layer",
]


# ---------------------------------------------------------------------------------------------
# Writing


_RETAR_MIN = 64
"""``cache.layers.retar.MIN_MEMBERS``, here so a small layer does not import that module."""
METER_MIN_BYTES = 4 << 20
"""A layer whose files hold fewer bytes is written too fast for a byte counter to be seen."""
METER_STEP = 8 << 20
METER_REPORTS = 64
"""A metered layer reports every ``max(METER_STEP, total / METER_REPORTS)`` bytes and at the
end: a few dozen reports at most, however many files and bytes."""


class _Meter:
    """The tar being written, counting what goes in as ``progress(done, total)`` (``done``
    counts the tar's bytes, headers included, capped at ``total``: the files' bytes)."""

    def __init__(self, w: BlobWriter, total: int, progress: Callable[[int, int], None]) -> None:
        self.w, self.total, self.progress = w, total, progress
        self.step = max(METER_STEP, total // METER_REPORTS)
        self.done = self.told = 0

    @property
    def size(self) -> int:
        return self.w.size

    def write(self, b: bytes | bytearray | memoryview) -> int:
        n = self.w.write(b)
        self.done += len(b)
        if self.done - self.told >= self.step and self.done < self.total:
            self.told = self.done
            self.progress(self.done, self.total)
        return n


def write_layer(
    entries: Iterable[Entry],
    store: ContentStore,
    progress: Callable[[int, int], None] | None = None,
    *,
    shapes: Path | None = None,
) -> LayerInfo:
    """Write entries as a deterministic uncompressed layer tar into the store.

    Entries may come in any order.  Regular files' bytes are streamed from ``entry.source``
    and must be exactly ``entry.size`` long; their blake3 is computed on the way and fills
    ``digest`` when the caller left it empty (a different non-empty digest means the file
    changed).  Returns the layer's diff_id, tar size and TOC (entries in tar order, with the
    data ``offset`` of each regular file and ``source=None``).

    ``progress(done, total)`` is the byte counter of a long copy: told now and then while
    files of ``METER_MIN_BYTES`` or more in all are written, and ``(total, total)`` at the
    end (``_Meter``); not called for a smaller layer.

    ``shapes``: the directory of :mod:`cache.layers.retar`'s records; a layer of as many
    members as that module takes is then written from the previous tar of its shape when
    there is one (its unchanged members copied, the others written as here).
    """
    planned = _plan(entries)
    toc: list[Entry] = []
    total = sum(e.size for _, e in planned if e.type == "file")
    metered = progress is not None and total >= METER_MIN_BYTES
    if shapes is not None and len(planned) >= _RETAR_MIN:
        from cache.layers.retar import rewrite

        with _BlobFiles(store) as files:
            layer = rewrite(
                planned,
                store,
                shapes,
                _headers,
                _header_len,
                lambda e, h, w: _copy_content(e, h, files, w),
            )
        if layer is not None:
            if metered:
                assert progress is not None
                progress(total, total)
            return layer
    with _BlobFiles(store) as blobs, store.ingest() as ingest:
        w: BlobWriter | _Meter = ingest
        if metered:
            assert progress is not None
            w = _Meter(ingest, total, progress)
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
    if metered:
        assert progress is not None
        progress(total, total)
    return LayerInfo(diff_id=ingest.digest, size=ingest.size, toc=tuple(toc))


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


def _header_len(name: str, e: Entry) -> int:
    """``len(_headers(name, e))`` without making it when ustar holds everything (one block;
    the same tests as ``_headers``' for a PAX header: name, link, numbers, xattrs)."""
    if (
        len(name) <= 100
        and name.isascii()
        and not e.xattrs
        and (not e.link or (len(e.link) <= 100 and e.link.isascii()))
        and 0 <= e.uid < _MAX_OCTAL_8
        and 0 <= e.gid < _MAX_OCTAL_8
        and 0 <= e.size < _MAX_OCTAL_12
        and 0 <= e.mtime < _MAX_OCTAL_12
    ):
        return _BLOCK
    return len(_headers(name, e))


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

    def __init__(self, store: ContentStore) -> None:
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


def _copy_content(e: Entry, header: bytes, blobs: _BlobFiles, w: BlobWriter | _Meter) -> str:
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
        data = _read_host_file(src.host_path, e.size, src.ident)
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
    e: Entry, header: bytes, padding: bytes, blobs: _BlobFiles, w: BlobWriter | _Meter
) -> str:
    """``_copy_content`` for a file bigger than ``_CHUNK``, from a host file or a blob."""
    src = e.source
    assert src is not None
    h = blake3()
    w.write(header)
    if src.host_path is not None:
        with open_host_file(src.host_path, src.ident, e.size) as f:
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


def open_host_file(path: str, ident: tuple[int, int] | None = None,
                   size: int | None = None) -> BinaryIO:
    """Open a host (context) file for a layer, once: never through a symlink in its last
    component (one swapped in since the walk would leak what it points at), never hanging on
    a fifo; the open file must be a regular file with the walk's (device, inode) ``ident``
    and ``size`` bytes, or it is "file changed while being read: PATH" (exit 1).

    The caller hashes what it reads from this descriptor and compares it with the entry's
    content digest (the plan's), so a file changed in place is caught too."""
    changed = f"file changed while being read: {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOENT, errno.ENOTDIR):
            raise LbuildError(changed) from None
        raise
    st = os.fstat(fd)
    problem = (
        "not a regular file" if not stat.S_ISREG(st.st_mode)
        else "not the file the context walk saw" if ident is not None
        and (st.st_dev, st.st_ino) != ident
        else f"{st.st_size} bytes, not {size}" if size is not None and st.st_size != size
        else ""
    )
    if problem:
        os.close(fd)
        raise LbuildError(f"{changed} ({problem})")
    return os.fdopen(fd, "rb", buffering=0)


def _read_host_file(path: str, size: int, ident: tuple[int, int] | None) -> bytes | None:
    """The whole content of a host file that should be ``size`` bytes; None if it is not.

    Asks for one byte more than expected, then reads on (a read may return less than asked)
    until the end of the file or that extra byte: a file that grew is seen, as one that shrank.
    """
    with open_host_file(path, ident, size) as f:
        data = f.read(size + 1)
        while len(data) <= size:
            more = f.read(size + 1 - len(data))
            if not more:
                break
            data += more
    return data if len(data) == size else None



def _copy_exact(f: BinaryIO, size: int, w: BlobWriter | _Meter, h: _Hasher) -> bool:
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
