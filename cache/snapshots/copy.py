"""The copy snapshotter: each committed snapshot is a full tree; works anywhere."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import stat
import struct
import time
from pathlib import Path

from cache.errors import InvalidInput
from cache.snapshots.base import Base
from cache.snapshots.diff import Found, entry_of, finish, same_content, same_meta, xattrs_of
from cache.snapshots.mount import Mount, load_libc
from cache.types import Entry

# How far a coarse inode ctime may lag the clock we read at the end of prepare.
_CTIME_SLACK_NS = 100_000_000


class CopySnapshotter(Base):
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
        out: list[Found] = []
        walker = _CopyDiff(d / "fs", lower, meta["dirs"], int(meta["prepared_ns"]), out)
        walker.walk("", has_lower=lower is not None)
        return finish(out)


class _CopyDiff:
    """Compares an active copy with its parent tree (see the module's diff rules)."""

    def __init__(
        self,
        top: Path,
        lower: Path | None,
        dirs: dict[str, list[int]],
        prepared_ns: int,
        out: list[Found],
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
                self.out.append(Found(Entry(path=rel, type="whiteout", mode=0), None))
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
                self.out.append(Found(entry_of(rel, path, st), st))
                if replaced or lst is None:
                    if replaced:
                        self.out.append(Found(Entry(path=rel, type="opaque", mode=0), None))
                    self.walk(rel, has_lower=False)
                    found = True
                    continue
                assert low is not None
                below = self.walk(rel, has_lower=True)
                if below or not same_meta(path, st, low, lst):
                    found = True
                else:
                    del self.out[idx]
                continue
            if low is not None and lst is not None and same_meta(path, st, low, lst):
                # Same metadata: only a file touched since prepare can differ in content.
                if (
                    not stat.S_ISREG(st.st_mode)
                    or st.st_ctime_ns < self.prepared_ns - _CTIME_SLACK_NS
                ):
                    continue
                if same_content(path, low):
                    continue
            self.out.append(Found(entry_of(rel, path, st), st))
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
        for key, value in xattrs_of(s):
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
    libc = load_libc()
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

