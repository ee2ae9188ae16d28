"""The members of a layer tar as a comparison sees them: every header field a diff reports.

The headers are read, and checked, by the layer reader (``cache.layers.tarread.read_headers``:
ustar, GNU long names and base-256 numbers, local and global PAX records, as Go's archive/tar
reads them; sparse members refused).  This module keeps what the TOC drops (uname, gname,
fractional PAX times, every PAX record) and is lenient where a TOC must not be: any typeflag,
any path and link target are reported as they are, not refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cache.errors import InvalidInput
from cache.layers.tarread import TarInput, _cstr, _number, read_data, read_headers

_BLOCK = 512
_EXPRESSED = frozenset({"path", "linkpath", "size", "uid", "gid", "uname", "gname", "mtime"})
_XATTR_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.")
_REGULAR = (b"0", b"\0", b"7")


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member of a layer as a comparison sees it (``order``: its position in the tar).

    ``path`` is normalised (no leading ``/`` or ``./``, no trailing ``/``; whiteouts keep their
    ``.wh.`` names).  ``pax`` holds the PAX records that no other field expresses (atime,
    ctime, comments, vendor records), sorted.
    """

    path: str
    order: int
    typeflag: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime: float
    link: str
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, str], ...]
    pax: tuple[tuple[str, str], ...]
    digest: str


def scan(stream: BinaryIO) -> Iterator[Member]:
    """The members of an uncompressed tar stream, in order, regular files' data hashed."""
    src = TarInput(stream)
    for order, (at, hdr, flag, size, raw_fields, name_b, link_b) in enumerate(read_headers(src)):
        fields = {k: _str(v) for k, v in raw_fields.items()}
        name = _str(name_b)
        if flag == b"\0" and name.endswith("/"):
            flag = b"5"  # pre-POSIX tars mark directories only by the trailing slash
        digest = ""
        if flag in _REGULAR:
            digest = read_data(src, size, name)
        elif size > 0:
            src.pad(size + (-size % _BLOCK))  # data of a member that has none: skipped
        yield _member(hdr, at, fields, name, _str(link_b), flag, size, digest, order)


def _str(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _pax_number(value: str, at: int) -> float:
    try:
        f = float(value)
    except ValueError:
        raise InvalidInput(f"invalid PAX number {value!r} at offset {at}") from None
    if not math.isfinite(f):
        raise InvalidInput(f"invalid PAX number {value!r} at offset {at}")
    return int(f) if f.is_integer() and "." not in value else f


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts) or "."


def _text(fields: dict[str, str], key: str, raw: bytes) -> str:
    return fields[key] if key in fields else _str(_cstr(raw))


def _int(fields: dict[str, str], key: str, raw: bytes, at: int) -> int:
    return int(_pax_number(fields[key], at)) if key in fields else _number(raw, at)


def _member(
    hdr: bytes,
    at: int,
    fields: dict[str, str],
    name: str,
    link: str,
    flag: bytes,
    size: int,
    digest: str,
    order: int,
) -> Member:
    device = flag in (b"3", b"4")
    xattrs: tuple[tuple[str, str], ...] = ()
    extra: tuple[tuple[str, str], ...] = ()
    if fields:
        xattrs = tuple(
            sorted(
                (k.split(".xattr.", 1)[1], v)
                for k, v in fields.items()
                if k.startswith(_XATTR_PREFIXES)
            )
        )
        extra = tuple(
            sorted(
                (k, v)
                for k, v in fields.items()
                if k not in _EXPRESSED and not k.startswith(_XATTR_PREFIXES)
            )
        )
    return Member(
        path=_clean(name),
        order=order,
        typeflag=flag.decode("latin-1"),
        mode=_number(hdr[100:108], at) & 0o7777,
        uid=_int(fields, "uid", hdr[108:116], at),
        gid=_int(fields, "gid", hdr[116:124], at),
        uname=_text(fields, "uname", hdr[265:297]),
        gname=_text(fields, "gname", hdr[297:329]),
        size=size if flag in _REGULAR else 0,
        mtime=_pax_number(fields["mtime"], at) if "mtime" in fields else _number(hdr[136:148], at),
        link=link,
        devmajor=_number(hdr[329:337], at) if device else 0,
        devminor=_number(hdr[337:345], at) if device else 0,
        xattrs=xattrs,
        pax=extra,
        digest=digest,
    )
