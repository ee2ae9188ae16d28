"""Snapshotters: root filesystems for RUN steps, built from committed layer snapshots.

Vocabulary (containerd's): a *key* names an active snapshot, which is writable (or, for a
*view*, read-only); a *name* names a committed snapshot, which never changes again; the
*parent* of a snapshot is the committed snapshot below it.  Snapshots of image layers are
committed under their OCI chain id (``chain_id``).

Lifecycle: ``prepare(key, parent)`` makes an active snapshot and returns the mounts that show
it; the caller mounts them (``mount_all``, usually inside a private mount namespace), changes
files, then either ``commit(name, key)`` (which consumes ``key``) or ``remove(key)``.  An active
snapshot is never committed in place under its key, and a committed one is never changed.
``diff(key)`` lists an active snapshot's changes against its parent as layer TOC entries.
Snapshotters return mount descriptions and mount nothing themselves.

Two backends share one on-disk bookkeeping (``root/active``, ``root/committed``, ``root/tmp``):

- ``OverlaySnapshotter``: each committed snapshot holds one layer's files (an overlayfs
  lowerdir); an active snapshot is a fresh upperdir over its parent chain, and the upperdir
  *is* the diff (``c 0 0`` devices are whiteouts, ``trusted.overlay.opaque=y`` marks opaque
  directories);
- ``CopySnapshotter``: each committed snapshot is a full tree; ``prepare`` copies the parent
  (a real copy, never hardlinks into the parent); ``diff`` walks both trees.

Diff rules (identical for both backends; the contract suite checks it):

- a non-directory is reported when it is new, or its type, permission bits, owner, size,
  content, link target, device number, xattrs or mtime differ from the parent's;
- a directory is reported when it is new, when its permission bits, owner or xattrs differ,
  or when anything below it is reported (so a layer carries its parent directories, as
  Docker's do); a directory's mtime alone never makes an entry;
- a path the parent had and the active snapshot lacks is a ``whiteout`` (only the topmost:
  a deleted directory is one whiteout);
- a directory that replaced a parent's non-directory, or that was deleted and made again,
  is reported as its ``dir`` entry, an ``opaque`` entry with the same path, and everything
  now inside it;
- of several reported paths sharing one inode, the first in order is a ``file`` and the
  others are ``hardlink`` entries pointing at it.

Entries are ordered by path components, a directory before its ``opaque`` entry.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cache.errors import AlreadyExists, InvalidInput, NotFound, StoreError, Unsupported
from cache.layers.apply import OVERLAY_OPAQUE_XATTR, apply_layer, remove_tree
from cache.types import ContentRef, Digest, Entry, EntryType, sha256_digest

__all__ = [
    "CopySnapshotter",
    "Mount",
    "OverlaySnapshotter",
    "Snapshotter",
    "chain_id",
    "choose_snapshotter",
    "cleanup_stale",
    "ensure_chain",
    "mount_all",
    "unmount",
]

# Overlay features that would put information into xattrs our diff does not read.
OVERLAY_OPTIONS = ("index=off", "metacopy=off", "redirect_dir=off")
# Mount option data is limited to one page; longer lowerdir lists are mounted relative.
_MAX_MOUNT_DATA = 4000
_CHUNK = 1 << 20
# How far a coarse inode ctime may lag the clock we read at the end of prepare.
_CTIME_SLACK_NS = 100_000_000


# ---------------------------------------------------------------------------------------
# mounts
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    """One mount that shows (part of) a snapshot: what ``mount(8)`` would be given.

    ``target`` is where it goes inside the root filesystem (``"/"`` for the root itself).
    """

    type: str
    source: str
    target: str
    options: tuple[str, ...]


MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

_FLAG_OPTIONS = {
    "ro": MS_RDONLY,
    "rw": 0,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def sys_mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2); raises OSError."""
    libc = _libc()
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    rc = libc.mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data is not None else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} {source or ''} on {target}: {os.strerror(err)}")


def sys_umount(target: str, flags: int = 0) -> None:
    """umount2(2); raises OSError."""
    libc = _libc()
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    if libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _split_options(options: Sequence[str]) -> tuple[int, list[str]]:
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAG_OPTIONS:
            flags |= _FLAG_OPTIONS[opt]
        else:
            data.append(opt)
    return flags, data


def _target_path(root: str, inner: str) -> str:
    inner = inner.strip("/")
    return os.path.join(root, inner) if inner else root


def mount_all(mounts: Sequence[Mount], target: Path | str) -> None:
    """Mount ``mounts`` in order onto the directory ``target`` (call it in a private mount ns).

    Overlay mounts whose option data would exceed a page are made with paths relative to
    their common directory (this changes the working directory for the call: use it in a
    single-threaded process).
    """
    root = str(target)
    for m in mounts:
        dst = _target_path(root, m.target)
        flags, data = _split_options(m.options)
        if m.type == "bind":
            sys_mount(m.source, dst, None, flags & (MS_BIND | MS_REC) | MS_BIND, None)
            if flags & MS_RDONLY:
                sys_mount(
                    None,
                    dst,
                    None,
                    MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & ~MS_REC & ~MS_BIND),
                    None,
                )
        elif m.type == "overlay":
            _mount_overlay(m, dst, flags, data)
        else:
            sys_mount(m.source, dst, m.type, flags, ",".join(data) or None)


def _mount_overlay(m: Mount, dst: str, flags: int, data: list[str]) -> None:
    text = ",".join(data)
    if len(text) <= _MAX_MOUNT_DATA:
        sys_mount(m.source, dst, "overlay", flags, text)
        return
    dirs: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            dirs.extend(value.split(":"))
        elif key in ("upperdir", "workdir"):
            dirs.append(value)
    base = os.path.commonpath(dirs)
    rel: list[str] = []
    for opt in data:
        key, _, value = opt.partition("=")
        if key == "lowerdir":
            rel.append("lowerdir=" + ":".join(os.path.relpath(v, base) for v in value.split(":")))
        elif key in ("upperdir", "workdir"):
            rel.append(f"{key}={os.path.relpath(value, base)}")
        else:
            rel.append(opt)
    text = ",".join(rel)
    if len(text) > _MAX_MOUNT_DATA:
        raise Unsupported(f"overlay mount needs {len(text)} bytes of options (too many layers)")
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(base)
        sys_mount(m.source, dst, "overlay", flags, text)
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def unmount(target: Path | str) -> None:
    """Unmount ``target`` (lazily when it is busy)."""
    try:
        sys_umount(str(target))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        sys_umount(str(target), MNT_DETACH)


# ---------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------
class Snapshotter(Protocol):
    """Creates, commits and removes snapshots; see the module docstring for the words used."""

    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        """Make a writable active snapshot ``key`` on top of committed ``parent``."""
        ...

    def view(self, key: str, parent: str) -> list[Mount]:
        """Make a read-only active snapshot ``key`` showing committed ``parent``."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts that show active snapshot ``key``."""
        ...

    def commit(self, name: str, key: str) -> None:
        """Turn active ``key`` into committed ``name`` (``key`` is gone afterwards).

        Raises ``AlreadyExists`` when ``name`` exists (``key`` is then left as it was).
        """
        ...

    def remove(self, key_or_name: str) -> None:
        """Remove an active or committed snapshot (a committed one must have no children)."""
        ...

    def exists(self, name: str) -> bool:
        """Whether committed snapshot ``name`` exists."""
        ...

    def diff(self, key: str) -> list[Entry]:
        """The changes in active ``key`` against its parent, as layer TOC entries."""
        ...

    def apply_target(self, key: str) -> tuple[Path, bool]:
        """The directory a layer is extracted into for active ``key``, and whether it takes
        overlay-style whiteouts (``apply_layer(..., overlay=...)``)."""
        ...

    def close(self) -> None:
        """Release what this object holds (locks on its active snapshots)."""
        ...


# ---------------------------------------------------------------------------------------
# shared bookkeeping
# ---------------------------------------------------------------------------------------
def _encode(name: str) -> str:
    """A directory name for a snapshot key or name."""
    from urllib.parse import quote

    if not name or name in (".", "..") or "\0" in name:
        raise InvalidInput(f"bad snapshot name {name!r}")
    enc = quote(name, safe="")
    if len(enc) > 200 or enc.startswith("."):
        enc = "~" + hashlib.sha256(name.encode()).hexdigest()
    return enc


def _lock_fd(path: Path, *, blocking: bool) -> int | None:
    """Open and flock ``path``; None when ``blocking`` is false and someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Base(ABC):
    """Bookkeeping shared by both snapshotters: directories, parents, locks."""

    overlay_layout = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._active = self.root / "active"
        self._committed = self.root / "committed"
        self._tmp = self.root / "tmp"
        self._locks_dir = self.root / "locks"
        for d in (self._active, self._committed, self._tmp, self._locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        # fds of the lock files of the active snapshots this object created.
        self._held: dict[str, int] = {}

    # -- paths ---------------------------------------------------------------------------
    def _adir(self, key: str) -> Path:
        return self._active / _encode(key)

    def _cdir(self, name: str) -> Path:
        return self._committed / _encode(name)

    def _active_info(self, key: str) -> tuple[Path, str, str | None]:
        d = self._adir(key)
        try:
            kind = (d / "kind").read_text()
        except FileNotFoundError:
            raise NotFound(f"no active snapshot {key!r}") from None
        return d, kind, _read_parent(d)

    def _chain(self, parent: str | None) -> list[Path]:
        """The committed directories from ``parent`` down to the bottom."""
        out: list[Path] = []
        seen: set[str] = set()
        while parent is not None:
            if parent in seen:
                raise StoreError(f"snapshot parent loop at {parent!r}")
            seen.add(parent)
            d = self._cdir(parent)
            if not d.is_dir():
                raise NotFound(f"no committed snapshot {parent!r}")
            out.append(d)
            parent = _read_parent(d)
        return out

    @contextlib.contextmanager
    def name_lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on ``name`` across processes (for ensure_chain)."""
        fd = _lock_fd(self._locks_dir / (_encode(name) + ".lock"), blocking=True)
        assert fd is not None
        try:
            yield
        finally:
            os.close(fd)

    # -- lifecycle -----------------------------------------------------------------------
    def _new_active(self, key: str, parent: str | None, kind: str) -> Path:
        final = self._adir(key)
        if final.exists():
            raise AlreadyExists(f"active snapshot {key!r} already exists")
        if parent is not None and not self._cdir(parent).is_dir():
            raise NotFound(f"no committed snapshot {parent!r}")
        work = self._tmp / f"new-{uuid.uuid4().hex}"
        work.mkdir()
        fd = _lock_fd(work / "lock", blocking=True)
        assert fd is not None
        try:
            if parent is not None:
                (work / "parent").write_text(parent)
            (work / "kind").write_text(kind)
            self._populate(work, parent, kind)
            try:
                os.rename(work, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise AlreadyExists(f"active snapshot {key!r} already exists") from None
                raise
        except BaseException:
            os.close(fd)
            remove_tree(work)
            raise
        self._held[key] = fd
        return final

    @abstractmethod
    def _populate(self, d: Path, parent: str | None, kind: str) -> None:
        """Fill a new active snapshot directory ``d`` on top of ``parent``."""

    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        self._new_active(key, parent, "active")
        return self.mounts(key)

    def view(self, key: str, parent: str) -> list[Mount]:
        self._new_active(key, parent, "view")
        return self.mounts(key)

    @abstractmethod
    def mounts(self, key: str) -> list[Mount]:
        """How to mount the active snapshot ``key`` (data; nothing is mounted here)."""

    def commit(self, name: str, key: str) -> None:
        d, kind, _parent = self._active_info(key)
        if kind != "active":
            raise InvalidInput(f"snapshot {key!r} is a view and cannot be committed")
        final = self._cdir(name)
        if final.exists():
            raise AlreadyExists(f"snapshot {name!r} already exists")
        self._before_commit(d)
        try:
            os.rename(d, final)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise AlreadyExists(f"snapshot {name!r} already exists") from None
            raise
        self._after_commit(final)
        self._release(key)

    def _before_commit(self, d: Path) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Leave a committed snapshot nothing but its files."""

    def _after_commit(self, d: Path) -> None:
        for extra in ("kind", "lock", "meta.json", "work"):
            p = d / extra
            if p.is_dir():
                remove_tree(p)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _release(self, key: str) -> None:
        fd = self._held.pop(key, None)
        if fd is not None:
            os.close(fd)

    def remove(self, key_or_name: str) -> None:
        a = self._adir(key_or_name)
        if a.is_dir():
            self._trash(a)
            self._release(key_or_name)
            return
        c = self._cdir(key_or_name)
        if not c.is_dir():
            raise NotFound(f"no snapshot {key_or_name!r}")
        for kind_dir in (self._active, self._committed):
            for child in kind_dir.iterdir():
                if _read_parent(child) == key_or_name:
                    raise StoreError(f"snapshot {key_or_name!r} still has children")
        self._trash(c)

    def _trash(self, d: Path) -> None:
        # Rename first so a half-removed snapshot is never visible under its name.
        trash = self._tmp / f"trash-{uuid.uuid4().hex}"
        os.rename(d, trash)
        remove_tree(trash)

    def exists(self, name: str) -> bool:
        return self._cdir(name).is_dir()

    def close(self) -> None:
        for key in list(self._held):
            self._release(key)

    def apply_target(self, key: str) -> tuple[Path, bool]:
        d, kind, _parent = self._active_info(key)
        if kind != "active":
            raise InvalidInput(f"snapshot {key!r} is a view")
        return d / "fs", self.overlay_layout


def _read_parent(d: Path) -> str | None:
    try:
        return (d / "parent").read_text()
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------
class OverlaySnapshotter(_Base):
    """Snapshots as overlayfs layers: a committed snapshot is one lowerdir (needs root)."""

    overlay_layout = True

    def _populate(self, d: Path, parent: str | None, kind: str) -> None:
        if kind == "active":
            (d / "fs").mkdir(mode=0o755)
            (d / "work").mkdir(mode=0o700)

    def mounts(self, key: str) -> list[Mount]:
        d, kind, parent = self._active_info(key)
        lowers = [str(p / "fs") for p in self._chain(parent)]
        for p in lowers:
            if ":" in p or "," in p:
                raise Unsupported(
                    f"snapshot path {p!r} contains ':' or ',' (overlayfs cannot use it)"
                )
        if kind == "view":
            if len(lowers) == 1:
                return [Mount("bind", lowers[0], "/", ("rbind", "ro"))]
            return [
                Mount(
                    "overlay",
                    "overlay",
                    "/",
                    ("ro", *OVERLAY_OPTIONS, "lowerdir=" + ":".join(lowers)),
                )
            ]
        if not lowers:
            return [Mount("bind", str(d / "fs"), "/", ("rbind", "rw"))]
        return [
            Mount(
                "overlay",
                "overlay",
                "/",
                (
                    *OVERLAY_OPTIONS,
                    "lowerdir=" + ":".join(lowers),
                    f"upperdir={d / 'fs'}",
                    f"workdir={d / 'work'}",
                ),
            )
        ]

    def diff(self, key: str) -> list[Entry]:
        d, kind, parent = self._active_info(key)
        if kind != "active":
            raise InvalidInput(f"snapshot {key!r} is a view: it has no changes")
        lowers = [p / "fs" for p in self._chain(parent)]
        out: list[_Found] = []
        _OverlayDiff(d / "fs", lowers, out).walk("", hidden=False)
        return _finish(out)


class _OverlayDiff:
    """Reads an overlayfs upperdir against its lowerdirs (see the module's diff rules)."""

    def __init__(self, upper: Path, lowers: list[Path], out: list[_Found]) -> None:
        self.upper = upper
        self.lowers = lowers
        self.out = out

    def lower(self, rel: str) -> str | None:
        """The real path of what the lowerdirs show at ``rel`` (None when nothing)."""
        parts = rel.split("/")
        for layer in self.lowers:
            cur = str(layer)
            hidden_below = False
            for i, part in enumerate(parts):
                cur = os.path.join(cur, part)
                try:
                    st = os.lstat(cur)
                except FileNotFoundError:
                    break
                if _is_whiteout(st):
                    return None
                if i == len(parts) - 1:
                    return cur
                if not stat.S_ISDIR(st.st_mode):
                    return None
                if _is_opaque(cur):
                    hidden_below = True
            if hidden_below:
                return None
        return None

    def walk(self, rel_dir: str, *, hidden: bool) -> bool:
        """Emit the changes below ``rel_dir``; ``hidden``: lower layers are not visible here."""
        found = False
        base = os.path.join(self.upper, rel_dir) if rel_dir else str(self.upper)
        for name in sorted(os.listdir(base)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = os.path.join(base, name)
            st = os.lstat(path)
            low = None if hidden else self.lower(rel)
            if _is_whiteout(st):
                if low is not None:
                    self.out.append(_Found(Entry(path=rel, type="whiteout", mode=0), None))
                    found = True
                continue
            if stat.S_ISDIR(st.st_mode):
                lst = os.lstat(low) if low is not None else None
                replaced = lst is not None and (_is_opaque(path) or not stat.S_ISDIR(lst.st_mode))
                idx = len(self.out)
                if replaced or lst is None:
                    self.out.append(_Found(_entry(rel, path, st), st))
                    if replaced:
                        self.out.append(_Found(Entry(path=rel, type="opaque", mode=0), None))
                    self.walk(rel, hidden=True)
                    found = True
                    continue
                assert low is not None
                self.out.append(_Found(_entry(rel, path, st), st))
                below = self.walk(rel, hidden=False)
                if below or not _same_meta(path, st, low, lst):
                    found = True
                else:
                    del self.out[idx]
                continue
            if low is not None and _unchanged(path, st, low, os.lstat(low)):
                continue
            self.out.append(_Found(_entry(rel, path, st), st))
            found = True
        return found


# ---------------------------------------------------------------------------------------
# copy
# ---------------------------------------------------------------------------------------
class CopySnapshotter(_Base):
    """Snapshots as full directory trees: works anywhere, costs a copy per prepare."""

    def _populate(self, d: Path, parent: str | None, kind: str) -> None:
        if kind != "active":
            return
        fs = d / "fs"
        dirs: dict[str, list[int]] = {}
        if parent is None:
            fs.mkdir(mode=0o755)
        else:
            copy_tree(self._cdir(parent) / "fs", fs, dirs)
        # Read the clock after the copy: a file whose ctime is older was not touched since.
        meta = {"prepared_ns": time.time_ns(), "dirs": dirs}
        (d / "meta.json").write_text(json.dumps(meta))

    def mounts(self, key: str) -> list[Mount]:
        d, kind, parent = self._active_info(key)
        if kind == "view":
            assert parent is not None
            return [Mount("bind", str(self._cdir(parent) / "fs"), "/", ("rbind", "ro"))]
        return [Mount("bind", str(d / "fs"), "/", ("rbind", "rw"))]

    def diff(self, key: str) -> list[Entry]:
        d, kind, parent = self._active_info(key)
        if kind != "active":
            raise InvalidInput(f"snapshot {key!r} is a view: it has no changes")
        meta = json.loads((d / "meta.json").read_text())
        lower = self._cdir(parent) / "fs" if parent is not None else None
        out: list[_Found] = []
        walker = _CopyDiff(d / "fs", lower, meta["dirs"], int(meta["prepared_ns"]), out)
        walker.walk("", has_lower=lower is not None)
        return _finish(out)


class _CopyDiff:
    """Compares an active copy with its parent tree (see the module's diff rules)."""

    def __init__(
        self,
        top: Path,
        lower: Path | None,
        dirs: dict[str, list[int]],
        prepared_ns: int,
        out: list[_Found],
    ) -> None:
        self.top = top
        self.lower = lower
        self.dirs = dirs
        self.prepared_ns = prepared_ns
        self.out = out

    def walk(self, rel_dir: str, *, has_lower: bool) -> bool:
        found = False
        base = os.path.join(self.top, rel_dir) if rel_dir else str(self.top)
        names = set(os.listdir(base))
        lower_names: set[str] = set()
        lbase = ""
        if has_lower and self.lower is not None:
            lbase = os.path.join(self.lower, rel_dir) if rel_dir else str(self.lower)
            lower_names = set(os.listdir(lbase))
        for name in sorted(names | lower_names):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name not in names:
                self.out.append(_Found(Entry(path=rel, type="whiteout", mode=0), None))
                found = True
                continue
            path = os.path.join(base, name)
            st = os.lstat(path)
            low = os.path.join(lbase, name) if name in lower_names else None
            lst = os.lstat(low) if low is not None else None
            if stat.S_ISDIR(st.st_mode):
                replaced = lst is not None and (
                    not stat.S_ISDIR(lst.st_mode) or self._remade(rel, path)
                )
                idx = len(self.out)
                self.out.append(_Found(_entry(rel, path, st), st))
                if replaced or lst is None:
                    if replaced:
                        self.out.append(_Found(Entry(path=rel, type="opaque", mode=0), None))
                    self.walk(rel, has_lower=False)
                    found = True
                    continue
                assert low is not None
                below = self.walk(rel, has_lower=True)
                if below or not _same_meta(path, st, low, lst):
                    found = True
                else:
                    del self.out[idx]
                continue
            if low is not None and lst is not None and _same_meta(path, st, low, lst):
                # Same metadata: only a file touched since prepare can differ in content.
                if (
                    not stat.S_ISREG(st.st_mode)
                    or st.st_ctime_ns < self.prepared_ns - _CTIME_SLACK_NS
                ):
                    continue
                if _same_content(path, low):
                    continue
            self.out.append(_Found(_entry(rel, path, st), st))
            found = True
        return found

    def _remade(self, rel: str, path: str) -> bool:
        """Whether directory ``rel`` is not the one prepare copied (deleted and made again)."""
        recorded = self.dirs.get(rel)
        if recorded is None:
            return True
        return _dir_identity(path) != recorded


def copy_tree(src: Path, dst: Path, dirs: dict[str, list[int]] | None = None) -> None:
    """Copy a tree with owners, modes, times, xattrs, devices and hardlinks (real copies).

    ``dirs`` receives, for every directory made, its identity (``_dir_identity``).
    """
    import shutil

    links: dict[tuple[int, int], str] = {}
    dir_times: list[tuple[str, os.stat_result]] = []
    is_root = os.geteuid() == 0

    def meta(s: str, d: str, st: os.stat_result) -> None:
        try:
            os.chown(d, st.st_uid, st.st_gid, follow_symlinks=False)
        except PermissionError:
            if is_root:
                raise
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(d, stat.S_IMODE(st.st_mode))
        for key, value in _xattrs(s):
            with contextlib.suppress(PermissionError):
                os.setxattr(d, key, value, follow_symlinks=False)

    def one(s: str, d: str, rel: str) -> None:
        st = os.lstat(s)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(d, 0o700)
            for name in os.listdir(s):
                one(os.path.join(s, name), os.path.join(d, name), f"{rel}/{name}" if rel else name)
            meta(s, d, st)
            dir_times.append((d, st))
            if dirs is not None:
                dirs[rel] = _dir_identity(d)
            return
        if st.st_nlink > 1:
            prior = links.get((st.st_dev, st.st_ino))
            if prior is not None:
                os.link(prior, d, follow_symlinks=False)
                return
            links[(st.st_dev, st.st_ino)] = d
        if stat.S_ISREG(mode):
            shutil.copyfile(s, d, follow_symlinks=False)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(s), d)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(d, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return  # sockets are not part of an image
        meta(s, d, st)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    one(str(src), str(dst), "")
    for d, st in dir_times:
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


_STATX_BTIME = 0x800
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_FDCWD = -100


def _dir_identity(path: str) -> list[int]:
    """[inode, birth time ns] of a path (birth time 0 where the filesystem has none)."""
    libc = _libc()
    buf = ctypes.create_string_buffer(256)
    libc.statx.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    if libc.statx(_AT_FDCWD, path.encode(), _AT_SYMLINK_NOFOLLOW, _STATX_BTIME | 0x100, buf) != 0:
        return [os.lstat(path).st_ino, 0]
    mask = struct.unpack_from("I", buf, 0)[0]
    ino = struct.unpack_from("Q", buf, 32)[0]
    if not mask & _STATX_BTIME:
        return [ino, 0]
    sec, nsec = struct.unpack_from("qI", buf, 80)
    return [ino, sec * 1_000_000_000 + nsec]


# ---------------------------------------------------------------------------------------
# diff helpers shared by both backends
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Found:
    """An entry found by a diff walk, with the stat needed to group hardlinks."""

    entry: Entry
    st: os.stat_result | None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _xattrs(path: str) -> list[tuple[str, bytes]]:
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


def _same_meta(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
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
    return _xattrs(a) == _xattrs(b)


def _unchanged(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> bool:
    if not _same_meta(a, sa, b, sb):
        return False
    return not stat.S_ISREG(sa.st_mode) or _same_content(a, b)


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca = fa.read(_CHUNK)
            cb = fb.read(_CHUNK)
            if ca != cb:
                return False
            if not ca:
                return True


def _blake3_file(path: str) -> str:
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return str(h.hexdigest())


def _entry(rel: str, path: str, st: os.stat_result) -> Entry:
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
        digest = _blake3_file(path)
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
        xattrs=tuple(_xattrs(path)),
        source=source,
    )


_RANK = {"dir": 0, "opaque": 1}


def _finish(found: list[_Found]) -> list[Entry]:
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


# ---------------------------------------------------------------------------------------
# chains, choosing, cleaning
# ---------------------------------------------------------------------------------------
def chain_id(diff_ids: Sequence[Digest]) -> Digest:
    """The OCI ChainID of a stack of layers (bottom first)."""
    if not diff_ids:
        raise InvalidInput("chain id of an empty layer list")
    cur = diff_ids[0]
    for d in diff_ids[1:]:
        cur = sha256_digest(hashlib.sha256(f"{cur} {d}".encode()).hexdigest())
    return cur


def ensure_chain(
    snap: Snapshotter, diff_ids: Sequence[Digest], open_layer: Callable[[Digest], BinaryIO]
) -> str:
    """Make sure committed snapshots exist for every prefix of ``diff_ids``; return the top name.

    Each missing layer is opened once, extracted (and verified) into a fresh active snapshot
    and committed under its chain id.  Another process doing the same at once is fine: a
    per-name lock serialises the work and "already exists" counts as success.
    """
    parent: str | None = None
    for i, diff_id in enumerate(diff_ids):
        name = str(chain_id(diff_ids[: i + 1]))
        if not snap.exists(name):
            lock = snap.name_lock(name) if isinstance(snap, _Base) else contextlib.nullcontext()
            with lock:
                if not snap.exists(name):
                    _extract_one(snap, name, parent, diff_id, open_layer)
        parent = name
    if parent is None:
        raise InvalidInput("ensure_chain needs at least one layer")
    return parent


def _extract_one(
    snap: Snapshotter,
    name: str,
    parent: str | None,
    diff_id: Digest,
    open_layer: Callable[[Digest], BinaryIO],
) -> None:
    key = f"extract-{os.getpid()}-{uuid.uuid4().hex}"
    snap.prepare(key, parent)
    try:
        target, overlay = snap.apply_target(key)
        with open_layer(diff_id) as stream:
            apply_layer(stream, target, expected=diff_id, name=f"layer {diff_id}", overlay=overlay)
        snap.commit(name, key)
    except AlreadyExists:
        snap.remove(key)
    except BaseException:
        with contextlib.suppress(Exception):
            snap.remove(key)
        raise


def overlay_works(root: Path) -> bool:
    """Whether an overlay mount with our options works under ``root`` (mounts and unmounts)."""
    if os.geteuid() != 0:
        return False  # lowerdirs written outside a user namespace need real whiteout devices
    tmp = Path(root) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    probe = tmp / f"probe-{uuid.uuid4().hex}"
    probe.mkdir()
    fd = _lock_fd(probe / "lock", blocking=True)
    try:
        for sub in ("l1", "l2", "u", "w", "m"):
            (probe / sub).mkdir()
        os.mknod(probe / "l1" / "gone", stat.S_IFCHR, os.makedev(0, 0))
        opts = ",".join(
            (
                *OVERLAY_OPTIONS,
                f"lowerdir={probe}/l1:{probe}/l2",
                f"upperdir={probe}/u",
                f"workdir={probe}/w",
            )
        )
        try:
            sys_mount("overlay", str(probe / "m"), "overlay", 0, opts)
        except OSError:
            return False
        unmount(probe / "m")
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)
        remove_tree(probe)


def choose_snapshotter(root: Path, prefer: str | None = None) -> Snapshotter:
    """The overlay snapshotter when a test mount succeeds under ``root``, else the copying one.

    ``prefer``: ``"overlay"`` (an error when it cannot work), ``"copy"``, or None.
    """
    if prefer not in (None, "overlay", "copy"):
        raise InvalidInput(f"unknown snapshotter {prefer!r} (use overlay or copy)")
    if prefer == "copy":
        return CopySnapshotter(root)
    if overlay_works(root):
        return OverlaySnapshotter(root)
    if prefer == "overlay":
        raise Unsupported(
            "the overlay snapshotter does not work here", hint="use the copy snapshotter"
        )
    return CopySnapshotter(root)


def _mount_points_under(root: str) -> list[str]:
    out: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as \ooo.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == root or point.startswith(root + "/"):
                out.append(point)
    return out


def cleanup_stale(root: Path) -> list[str]:
    """Remove what crashed builders left under ``root``; return the paths removed.

    Stale are: active snapshots and in-flight work directories whose lock no live process
    holds, and mounts below them.  Snapshots in use by a running builder are left alone.
    """
    root = Path(root)
    stale: list[Path] = []
    for area in ("active", "tmp"):
        d = root / area
        if not d.is_dir():
            continue
        for child in d.iterdir():
            lock = child / "lock"
            if child.is_dir() and lock.exists():
                fd = _lock_fd(lock, blocking=False)
                if fd is None:
                    continue  # a live process holds it
                os.close(fd)
            stale.append(child)
    removed: list[str] = []
    for d in stale:
        for point in sorted(_mount_points_under(str(d)), key=len, reverse=True):
            with contextlib.suppress(OSError):
                sys_umount(point, MNT_DETACH)
        # Another cleaner may be removing the same directory: losing that race is fine.
        with contextlib.suppress(OSError):
            if d.is_dir() and not d.is_symlink():
                remove_tree(d)
            else:
                d.unlink()
            removed.append(str(d))
    return removed
