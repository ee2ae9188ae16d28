"""Mounts: what shows a snapshot (``Mount``), and mount(2)/umount2(2) through libc."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cache.errors import Unsupported

# Mount option data is limited to one page; longer lowerdir lists are mounted relative.
_MAX_MOUNT_DATA = 4000

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


def load_libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def sys_mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    """mount(2); raises OSError."""
    libc = load_libc()
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
    libc = load_libc()
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


def mounted_once(mounts: Sequence[Mount]) -> list[Mount]:
    """``mounts`` for a snapshot mounted once and then thrown away (a RUN's): writable
    overlays get ``volatile``.  Without it, unmounting an overlay syncs the whole file system
    its upperdir is on, other processes' dirty pages included (20-40 ms per RUN here, more
    beside another builder).  Safe for a RUN because its upperdir is read back into a layer
    (written and fsync'd by lbuild) right after it and then removed; the kernel refuses a
    second mount of a volatile upperdir, hence not for snapshots in general.  A kernel
    without it (before 5.10) mounts without it (:func:`_mount_overlay`)."""
    out: list[Mount] = []
    for m in mounts:
        if m.type == "overlay" and any(o.startswith("upperdir=") for o in m.options):
            m = Mount(m.type, m.source, m.target, (*m.options, "volatile"))
        out.append(m)
    return out


def _mount_overlay(m: Mount, dst: str, flags: int, data: list[str]) -> None:
    try:
        _mount_overlay_once(m, dst, flags, data)
    except OSError as exc:
        # "volatile" (Linux 5.10) is only a speed-up: a kernel that does not know it says
        # EINVAL, and the same mount without it is what it would have been before
        if exc.errno != errno.EINVAL or "volatile" not in data:
            raise
        _mount_overlay_once(m, dst, flags, [o for o in data if o != "volatile"])


def _mount_overlay_once(m: Mount, dst: str, flags: int, data: list[str]) -> None:
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

