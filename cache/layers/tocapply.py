"""Extracting a layer by its table of contents: no tar parsing, every file checked.

``apply_layer`` reads a tar stream with ``tarfile`` (and hashes it whole, so a layer from
anywhere is verified against its diff_id).  A layer in the content store whose TOC is known
(every layer lbuild wrote or imported has one, with each file's data offset) can be made
faster from the TOC itself: directories, links and devices come from the TOC's rows, and
each regular file's bytes are read from the stored tar at its offset, hashed with blake3 as
they are written and compared with the TOC's content digest (a mismatch raises
``DigestMismatch``: the snapshot is then garbage and must not be committed).  The result is
the same tree ``apply_layer`` makes, with one difference: times are whole seconds (the TOC
keeps no fractions; layers lbuild writes have none).

Used by the overlay snapshotter for its per-layer directories (an edit below a RUN extracts
the edited layer on the critical path: this is most of that time).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from cache.errors import DigestMismatch, InvalidInput
from cache.layers.apply import OVERLAY_OPAQUE_XATTR, _Applier, _ensure_dir
from cache.layers.toc import inside_layer
from cache.types import Entry

_CHUNK = 1 << 20


def toc_extractable(toc: Sequence[Entry]) -> bool:
    """Whether ``apply_toc`` can make this layer (every file has its offset and digest)."""
    return all(e.offset >= 0 and e.digest for e in toc if e.type == "file")


def apply_toc(
    blob: BinaryIO,
    toc: Sequence[Entry],
    dest: Path,
    *,
    name: str = "layer",
    overlay: bool = False,
    parents: Mapping[str, Entry | None] | None = None,
) -> None:
    """Make ``dest`` hold the layer whose uncompressed tar is the open file ``blob`` and
    whose TOC is ``toc`` (see the module docstring); same targets and rules as
    ``apply_layer``."""
    import blake3

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    a = _Applier(dest, name=name, overlay=overlay, parents=parents)
    fd = blob.fileno()
    for e in toc:
        rel = e.path
        if not rel:
            if e.type == "dir":
                a.members.add("")
                a.kept_times.pop("", None)
                _meta(a, "", e)
            continue
        if not inside_layer(rel):
            raise InvalidInput(f"{name}: bad path {rel!r} in the layer's table of contents")
        a._check_parents(rel, rel)
        path = a._abs(rel)
        if e.type == "opaque":
            if _ensure_dir(path, 0o755):
                a.created.add(rel)
            if overlay:
                os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            else:
                for child in os.listdir(path):
                    if f"{rel}/{child}" not in a.created:
                        a._remove(os.path.join(path, child))
            continue
        if e.type == "whiteout":
            if overlay:
                a._remove(path)
                os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                a._chown(path, e.uid, e.gid)
            elif rel not in a.created:
                a._remove(path)
            continue
        if e.type == "dir":
            a.members.add(rel)
            a.kept_times.pop(rel, None)
            _ensure_dir(path, 0o700)
        else:
            a._remove(path)
            if e.type == "file":
                write_file(fd, e, path, name, blake3.blake3, meta=a)
                a.created.add(rel)
                continue
            if e.type == "symlink":
                os.symlink(e.link, path)
            elif e.type == "hardlink":
                if not inside_layer(e.link):
                    raise InvalidInput(f"{name}: hardlink {rel!r} -> {e.link!r}: bad target")
                target = a._abs(e.link)
                a._check_parents(e.link, e.link)
                if not os.path.lexists(target) or os.path.isdir(target):
                    raise InvalidInput(f"{name}: hardlink {rel!r} -> {e.link!r}: bad target")
                os.link(target, path, follow_symlinks=False)
                a.created.add(rel)
                continue
            elif e.type in ("char", "block"):
                kind = stat.S_IFCHR if e.type == "char" else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(e.devmajor, e.devminor))
            elif e.type == "fifo":
                os.mkfifo(path, 0o600)
        a.created.add(rel)
        _meta(a, rel, e)
    a.finish()


def write_file(
    fd: int,
    e: Entry,
    path: str,
    name: str,
    hasher: type,
    *,
    in_place: bool = False,
    meta: _Applier | None = None,
) -> None:
    """Write regular file ``e`` at ``path`` from the layer tar ``fd`` at its offset, checked
    against its blake3: a new file, or (``in_place``) over the existing one's bytes.  With
    ``meta``, the new file also gets its owner, mode, xattrs and times, through its
    descriptor: an owner or mode it was created with is not set again (each is a journaled
    inode update on ext4; 2,200 of them were a fifth of unpacking the bench's layer)."""
    h = hasher()
    how = os.O_TRUNC if in_place else os.O_CREAT | os.O_EXCL
    mode = e.mode & 0o777 if meta is not None else 0o600
    out = os.open(path, os.O_WRONLY | how | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        pos, left = e.offset, e.size
        while left > 0:
            chunk = os.pread(fd, min(_CHUNK, left), pos)
            if not chunk:
                raise InvalidInput(f"{name}: {e.path} is truncated in the layer tar")
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view) :]
            pos += len(chunk)
            left -= len(chunk)
        actual = h.hexdigest()
        if actual != e.digest:
            raise DigestMismatch(f"{name}: {e.path}", e.digest, actual)
        if meta is not None:
            _fd_meta(meta, out, path, e)
    finally:
        os.close(out)


def _fd_meta(a: _Applier, out: int, path: str, e: Entry) -> None:
    """``_meta`` for a regular file just made, through its descriptor ``out``."""
    st = os.fstat(out)
    want = e.mode & 0o7777
    chowned = (st.st_uid, st.st_gid) != (e.uid, e.gid)
    if chowned:
        try:
            os.fchown(out, e.uid, e.gid)
        except PermissionError:
            if a.is_root:
                raise
    if chowned or stat.S_IMODE(st.st_mode) != want:  # chown clears setuid/setgid
        os.fchmod(out, want)
    if e.xattrs:
        a._set_xattrs(path, e.xattrs, e.path)
    ns = e.mtime * 1_000_000_000
    os.utime(out, ns=(ns, ns))


def _meta(a: _Applier, rel: str, e: Entry) -> None:
    path = a._abs(rel)
    a._chown(path, e.uid, e.gid)
    if e.type != "symlink":
        os.chmod(path, e.mode & 0o7777)  # after chown: chown clears setuid/setgid
    a._set_xattrs(path, e.xattrs, rel)
    ns = e.mtime * 1_000_000_000
    if e.type == "dir":
        a.dir_times.append((path, ns))
    else:
        os.utime(path, ns=(ns, ns), follow_symlinks=False)
