"""Snapshotters: root filesystems for RUN steps (the package's front door).

The package is split by concern (see ``cache.snapshots.base`` for the vocabulary and the
diff rules):

- ``mount``: ``Mount`` descriptions and mount(2)/umount2(2);
- ``base``: the ``Snapshotter`` Protocol and the bookkeeping both backends share;
- ``overlay`` / ``copy``: the two backends; ``diff``: what both diffs share;
- ``chain``: chain ids, and ``ensure_chain`` which makes the snapshots a RUN stacks on
  (for overlay, one directory per layer *by content*, shared by every chain that holds it);
- ``verify``: checking committed snapshots against their layers' tables of contents, and
  the GC of layer directories no chain needs.

This module re-exports what callers use, picks a backend and cleans up after crashes.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from cache.errors import InvalidInput, Unsupported
from cache.layers.apply import remove_tree
from cache.snapshots.base import Snapshotter, lock_fd
from cache.snapshots.chain import chain_id, ensure_chain
from cache.snapshots.copy import CopySnapshotter, copy_tree
from cache.snapshots.mount import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
    Mount,
    mount_all,
    sys_mount,
    sys_umount,
    unmount,
)
from cache.snapshots.overlay import OVERLAY_OPTIONS, OverlaySnapshotter, overlay_works

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "OVERLAY_OPTIONS",
    "CopySnapshotter",
    "Mount",
    "OverlaySnapshotter",
    "Snapshotter",
    "chain_id",
    "choose_snapshotter",
    "cleanup_stale",
    "copy_tree",
    "ensure_chain",
    "mount_all",
    "overlay_works",
    "sys_mount",
    "sys_umount",
    "unmount",
]


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
                fd = lock_fd(lock, blocking=False)
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
