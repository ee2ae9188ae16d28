"""Reading a layer tar's table of contents: ustar, GNU and PAX headers, verified as they
stream by (checksums, sizes, names that stay inside the root), content hashed with blake3.

A TOC entry's ``offset`` is where the member's bytes start in the tar, so a file can be read
back from the stored tar without unpacking it (``cache.layers.compress.open_member``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from blake3 import blake3

from cache.errors import InvalidInput, Unsupported
from cache.layers.tarfmt import (
    _BLOCK,
    _CHUNK,
    _OPAQUE,
    _WH,
    _XATTR,
    _ZERO_BLOCK,
    _Hasher,
)
from cache.types import (
    Entry,
    EntryType,
)


class TarInput:
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
    return _scan(TarInput(stream))


_MAX_META = 1 << 20
"""Largest PAX or GNU long-name/long-link header data read (Go's archive/tar: 1 MiB)."""

RawHeader = tuple[int, bytes, bytes, int, dict[str, bytes], bytes, bytes]
"""One member as :func:`read_headers` yields it: ``(offset, header, typeflag, size, fields,
name, link)``: where its 512-byte header block starts, that block, its typeflag, its data size
(a PAX ``size`` applied), its PAX records (global ones, then its own; never modify them), and
its name and link target as raw bytes (from PAX, GNU long names or the ustar fields)."""


def read_headers(src: TarInput) -> Iterator[RawHeader]:
    """The members of an uncompressed tar, header by header, checked as they stream by.

    Checksums, numbers, PAX records and GNU long names are read and verified here; sparse
    members are refused.  The caller consumes each member's data (and padding) from ``src``
    before asking for the next header.  The one tar header reader: the TOC reader below and
    the comparisons of ``lbuild diff`` (builder/compare/tarscan.py) both read through it.
    """
    global_pax: dict[str, bytes] = {}
    pax: dict[str, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    while True:
        start = src.pos
        hdr = src.read(_BLOCK)
        if not hdr or hdr == _ZERO_BLOCK:
            return  # end of archive (a missing end marker is tolerated, as Go's reader does)
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
        name = fields.get("path") or long_name or _ustar_name(hdr)
        link = fields.get("linkpath") or long_link or _cstr(hdr[157:257])
        long_name = long_link = None
        if typeflag == b"S" or (fields and any(k.startswith("GNU.sparse.") for k in fields)):
            raise Unsupported(f"sparse files in layer tars are not supported (at offset {start})")
        if "size" in fields:
            size = _pax_int(fields["size"], start)
        yield start, hdr, typeflag, size, fields, name, link


def _scan(src: TarInput) -> tuple[Entry, ...]:
    """The TOC entries of the members :func:`read_headers` reads from ``src``."""
    entries: list[Entry] = []
    for start, hdr, typeflag, size, fields, name_b, link_b in read_headers(src):
        uid = _pax_int(fields["uid"], start) if "uid" in fields else _number(hdr[108:116], start)
        gid = _pax_int(fields["gid"], start) if "gid" in fields else _number(hdr[116:124], start)
        mtime = (
            _pax_int(fields["mtime"], start) if "mtime" in fields else _number(hdr[136:148], start)
        )
        mode = _number(hdr[100:108], start) & 0o7777
        name = name_b.decode("utf-8", "surrogateescape")
        _check_ranges(name, uid, gid, mtime)
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
            digest = read_data(src, size, name)
        else:
            size = 0
            if kind in ("char", "block"):
                major, minor = _number(hdr[329:337], start), _number(hdr[337:345], start)
            elif kind == "symlink":
                link = link_b.decode("utf-8", "surrogateescape")
                if not link:  # Linux has no such thing: nothing could extract it
                    raise InvalidInput(f"layer tar: symlink {name} has an empty target")
                if "\0" in link:
                    raise InvalidInput(f"layer tar: symlink {name} has a NUL byte in its target")
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


def read_data(src: TarInput, size: int, name: str) -> str:
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
    if "\0" in name:  # only a PAX path can hold one: no file system takes it
        raise InvalidInput(f"layer tar: member {name!r} has a NUL byte in its name")
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


MAX_ID = (1 << 32) - 2
"""The largest uid or gid a file can have (``(uid_t) -1`` means "no change" to chown)."""
MAX_MTIME_S = (1 << 63) - 1
"""The largest modification time a file can be given (a 64-bit ``time_t``; file systems clamp
to their own range, ext4's ends in 2446)."""


def owner_in_range(uid: int, gid: int) -> bool:
    """Whether a file can have this owner (chown would overflow or refuse otherwise)."""
    return 0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID


def mtime_in_range(mtime: float) -> bool:
    """Whether a file can be given this modification time (utime would overflow otherwise)."""
    return -MAX_MTIME_S <= mtime <= MAX_MTIME_S


def _check_ranges(name: str, uid: int, gid: int, mtime: int) -> None:
    """Owner and time a file can have: anything else is an error, not an overflow later."""
    if not owner_in_range(uid, gid):
        raise InvalidInput(f"layer tar: member {name!r} has an owner out of range ({uid}:{gid})")
    if not mtime_in_range(mtime):
        raise InvalidInput(f"layer tar: member {name!r} has a modification time out of range")


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
