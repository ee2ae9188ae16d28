"""Snapshotters: the Protocol, its vocabulary and the bookkeeping both backends share.

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
import errno
import fcntl
import hashlib
import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from cache.errors import AlreadyExists, InvalidInput, NotFound, StoreError
from cache.home import USED, mark_used
from cache.layers.apply import remove_tree
from cache.snapshots.mount import Mount
from cache.types import Digest, Entry


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

    def name_lock(self, name: str) -> AbstractContextManager[None]:
        """Hold the lock that serialises making committed snapshot ``name`` (across
        processes): ``ensure_chain`` extracts a missing layer under it."""
        ...

    def note_chain(self, key: str, chain: Sequence[Digest]) -> None:
        """Record which layers active ``key`` will hold once committed (for ``cache verify``
        and the GC)."""
        ...

    def close(self) -> None:
        """Release what this object holds (locks on its active snapshots)."""
        ...


@runtime_checkable
class LayerStacks(Protocol):
    """A snapshotter whose committed snapshots are stacks of per-layer directories shared by
    content (the overlay snapshotter): ``ensure_chain`` makes each missing layer directory
    once and commits a stack per chain instead of extracting onto a copy."""

    def ensure_layer(
        self,
        diff_id: Digest,
        parents: Mapping[str, Entry | None],
        open_layer: Callable[[Digest], BinaryIO],
        toc: Sequence[Entry] | None = None,
        *,
        reuse: bool = True,
    ) -> str:
        """The name of the directory holding layer ``diff_id`` on top of ``parents``
        (``reuse``: it may be made from another layer's directory, see
        ``cache.snapshots.reuse``)."""
        ...

    def has_stack(self, name: str) -> bool:
        """Whether committed stack ``name`` exists and its layer directory with it."""
        ...

    def commit_stack(self, name: str, parent: str | None, layer: str) -> None:
        """Commit snapshot ``name``: layer directory ``layer`` on committed ``parent``."""
        ...


# ---------------------------------------------------------------------------------------
# shared bookkeeping
# ---------------------------------------------------------------------------------------
def encode_name(name: str) -> str:
    """A directory name for a snapshot key or name."""
    from urllib.parse import quote

    if not name or name in (".", "..") or "\0" in name:
        raise InvalidInput(f"bad snapshot name {name!r}")
    enc = quote(name, safe="")
    if len(enc) > 200 or enc.startswith("."):
        enc = "~" + hashlib.sha256(name.encode()).hexdigest()
    return enc


def lock_fd(path: Path, *, blocking: bool, shared: bool = False) -> int | None:
    """Open and flock ``path`` (exclusive, or ``shared``); None when ``blocking`` is false
    and someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        how = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        fcntl.flock(fd, how | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Base(ABC):
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
        return self._active / encode_name(key)

    def _cdir(self, name: str) -> Path:
        return self._committed / encode_name(name)

    def _active_info(self, key: str) -> tuple[Path, str, str | None]:
        d = self._adir(key)
        try:
            kind = (d / "kind").read_text()
        except FileNotFoundError:
            raise NotFound(f"no active snapshot {key!r}") from None
        return d, kind, read_parent(d)

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
            parent = read_parent(d)
        return out

    def name_lock_path(self, name: str) -> Path:
        """The file ``name_lock`` locks."""
        return self._locks_dir / (encode_name(name) + ".lock")

    @contextlib.contextmanager
    def name_lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on ``name`` across processes (for ensure_chain)."""
        fd = lock_fd(self.name_lock_path(name), blocking=True)
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
        if parent is not None:
            self.mark_used(parent)
        work = self._tmp / f"new-{uuid.uuid4().hex}"
        work.mkdir()
        fd = lock_fd(work / "lock", blocking=True)
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
        self.mark_used(name)
        self._release(key)

    def mark_used(self, name: str) -> None:
        """Record that committed snapshot ``name`` was used now (``cache prune`` ages
        snapshots by it: ``cache.home.USED``)."""
        mark_used(self._cdir(name) / USED)

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
                if read_parent(child) == key_or_name:
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

    def note_chain(self, key: str, chain: Sequence[Digest]) -> None:
        # What the tree holds, for ``cache verify`` and the GC (cache.snapshots.verify).
        d, _kind, _parent = self._active_info(key)
        (d / "diff_ids").write_text(json.dumps(list(chain)))


def read_parent(d: Path) -> str | None:
    try:
        return (d / "parent").read_text()
    except FileNotFoundError:
        return None

