"""Diff helpers shared by both snapshotters (the rules are in ``cache.snapshots.base``)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cache.errors import Unsupported
from cache.layers.apply import OVERLAY_OPAQUE_XATTR
from cache.types import ContentRef, Entry, EntryType

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Found:
    """An entry found by a diff walk, with the stat needed to group hardlinks."""

    entry: Entry
    st: os.stat_result | None


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def xattrs_of(path: str) -> list[tuple[str, bytes]]:
    """A path's xattrs, sorted, without overlayfs' own."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out: list[tuple[str, bytes]] = []
    for name in names:
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue
    return sorted(out)


def same_meta(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    """Whether two paths agree on everything but content (mtime ignored for directories)."""
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return False
    if (stat.S_IMODE(sa.st_mode), sa.st_uid, sa.st_gid) != (
        stat.S_IMODE(sb.st_mode),
        sb.st_uid,
        sb.st_gid,
    ):
        return False
    if not stat.S_ISDIR(sa.st_mode):
        if sa.st_mtime_ns != sb.st_mtime_ns or sa.st_size != sb.st_size:
            return False
        if (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
            return False
        if stat.S_ISLNK(sa.st_mode) and os.readlink(a) != os.readlink(b):
            return False
    return xattrs_of(a) == xattrs_of(b)


def unchanged(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    if not same_meta(a, sa, b, sb):
        return False
    return not stat.S_ISREG(sa.st_mode) or same_content(a, b)


def same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca = fa.read(_CHUNK)
            cb = fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def blake3_file(path: str) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def entry_of(rel: str, path: str, st: os.stat_result) -> Entry:
    """The TOC entry for the object at ``path`` (stat ``st``), named ``rel``."""
    mode = st.st_mode
    kind: EntryType
    size = 0
    digest = ""
    link = ""
    source = None
    major = minor = 0
    if stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISREG(mode):
        kind = "file"
        size = st.st_size
        digest = blake3_file(path)
        source = ContentRef(host_path=path)
    elif stat.S_ISLNK(mode):
        kind = "symlink"
        link = os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "char" if stat.S_ISCHR(mode) else "block"
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        kind = "fifo"
    else:
        raise Unsupported(f"{rel}: sockets cannot be put in a layer")
    return Entry(
        path=rel,
        type=kind,
        mode=stat.S_IMODE(mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        digest=digest,
        link=link,
        mtime=int(st.st_mtime),
        devmajor=major,
        devminor=minor,
        xattrs=tuple(xattrs_of(path)),
        source=source,
    )


_RANK = {"dir": 0, "opaque": 1}


def finish(found: list[Found]) -> list[Entry]:
    """Order the entries and turn later paths of a shared inode into hardlinks."""
    found.sort(key=lambda f: (f.entry.path.split("/"), _RANK.get(f.entry.type, 2)))
    first: dict[tuple[int, int], str] = {}
    out: list[Entry] = []
    for f in found:
        e, st = f.entry, f.st
        if st is not None and e.type == "file" and st.st_nlink > 1:
            ident = (st.st_dev, st.st_ino)
            if ident in first:
                e = Entry(
                    path=e.path,
                    type="hardlink",
                    mode=e.mode,
                    uid=e.uid,
                    gid=e.gid,
                    link=first[ident],
                    mtime=e.mtime,
                    xattrs=e.xattrs,
                )
            else:
                first[ident] = e.path
        out.append(e)
    return out

