"""The tar format lbuild writes and reads: block size, member names, type flags, header layout.

Shared by the writer (:mod:`cache.layers.tar`), the reader (:mod:`cache.layers.tarread`) and
the codecs (:mod:`cache.layers.compress`).
"""

from __future__ import annotations

import struct
from typing import Protocol

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


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
