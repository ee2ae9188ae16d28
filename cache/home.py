"""The cache home: the one owner of its layout, its lock, and the index writer a build starts
before anything else.

Layout of a home (``$LBUILD_HOME``, else ``$XDG_CACHE_HOME/lbuild``, else
``~/.cache/lbuild``)::

    lbuild.db           the index (SQLite, WAL)
    lock                flock: builds hold it shared, prune/verify exclusive
    blobs/sha256/<hex>  the content store
    memo/<key>.json     no-op memos
    snapshots/          committed and active snapshots (RUN); a committed one's ``used``
                        file's mtime is its last use
    cache-mounts/       RUN --mount=type=cache directories, each with ``<name>.used`` beside
                        it (mtime: its last use)
    tarshapes/<shape>   the last layer tar written of each shape (cache.layers.retar)
    tocs/<hex>          the TOC blob of layer sha256:<hex> when no step record names one
                        (a base image's layers: cache.layers.toc.layer_toc)
    tmp/                in-flight files, swept on start

Every other module asks :class:`Home` for these paths instead of spelling them out.

This module is imported first by ``lbuild build`` and must stay light: it imports the
standard library only at its top (the writer child's module is imported by
:func:`start_writer`), so the writer child starts as early as possible (see
:mod:`cache.index.buildindex`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.index.recorder import Recorder


@dataclass(frozen=True)
class Home:
    """The paths of one cache home (nothing is created by asking)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "lbuild.db"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def blobs(self) -> Path:
        """``blobs/sha256``: one file per blob, named by its hex digest."""
        return self.root / "blobs" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def memo(self) -> Path:
        return self.root / "memo"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def cache_mounts(self) -> Path:
        return self.root / "cache-mounts"

    @property
    def tar_shapes(self) -> Path:
        return self.root / "tarshapes"

    @property
    def layer_tocs(self) -> Path:
        return self.root / "tocs"


def write_record(path: Path, text: str) -> None:
    """Replace the small file ``path`` (a record under the home: a shape's layer, a layer's
    TOC blob) with ``text`` at once: written to a hidden file beside it and renamed over it,
    so a reader sees the old text or the new one; the last writer wins.  Its directory is
    made when missing; the hidden file is removed when the write fails."""
    import uuid

    path.parent.mkdir(exist_ok=True)
    part = path.with_name(f".{path.name}-{uuid.uuid4().hex}")
    try:
        part.write_text(text)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


USED = "used"
"""A committed snapshot's last-use marker (inside its directory: only ``fs``/``layer`` is
ever mounted); a cache mount's is ``<dir>.used`` beside it (the directory itself is mounted)."""


def mount_marker(mount_dir: Path) -> Path:
    """The last-use marker of cache-mount directory ``mount_dir``: ``<dir>.used`` beside it."""
    return mount_dir.with_name(mount_dir.name + "." + USED)


def mark_used(marker: Path, now: float | None = None) -> None:
    """Record a use now (or at ``now``): ``marker``'s mtime, the file created if need be.
    Best effort: a home that refuses it only makes the thing look older to ``cache prune``."""
    try:
        try:
            os.utime(marker, None if now is None else (now, now))
        except FileNotFoundError:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644))
            if now is not None:
                os.utime(marker, (now, now))
    except OSError:
        pass


def last_used(marker: Path, fallback: Path) -> float:
    """When the thing ``marker`` stands for was last used: its mtime; without one (made
    before lbuild kept markers), ``fallback``'s mtime."""
    try:
        return marker.stat().st_mtime
    except OSError:
        return fallback.lstat().st_mtime


def default_home() -> Path:
    """The cache directory: ``$LBUILD_HOME``, else ``$XDG_CACHE_HOME/lbuild``, else ``~/.cache/lbuild``."""
    home = os.environ.get("LBUILD_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "lbuild"
    return Path.home() / ".cache" / "lbuild"


def home_dir(home: Path | None) -> Path:
    """The cache directory: ``--home``, else :func:`default_home`; made absolute, as paths
    under it reach processes that do not share our working directory (a RUN's sandbox
    helper mounts the snapshot's layer directories from ``/``)."""
    return Path(os.path.abspath(home if home is not None else default_home()))


HOME_HINT = "set LBUILD_HOME (or --home) to a directory this user can write"


def ensure_home(home: Path) -> Path:
    """Create the cache home (0700) if needed and check this user may use it; returns it.

    The home holds images' setuid binaries and world-writable directories (in snapshots),
    so it is private: a home this user owns is made 0700 when it is not; a home another
    user owns (other than root) or that others may write is refused.  An unusable home
    (read-only, no permission, a file in the way, HOME unset or pointing nowhere) is one
    ``StoreError`` line with the hint to set ``LBUILD_HOME``.
    """
    from cache.errors import StoreError

    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = home.stat()
    except OSError as e:
        raise StoreError(
            f"cannot use the cache home {home}: {e.strerror or e}", hint=HOME_HINT
        ) from None
    mine = st.st_uid == os.geteuid()
    if not mine and (st.st_uid != 0 or st.st_mode & 0o022):
        raise StoreError(
            f"the cache home {home} belongs to uid {st.st_uid} "
            f"(mode {st.st_mode & 0o7777:04o}): another user could change what builds use",
            hint=HOME_HINT,
        )
    if not os.access(home, os.W_OK | os.X_OK):
        import errno

        reason = "Read-only file system" if _read_only(home) else os.strerror(errno.EACCES)
        raise StoreError(f"cannot use the cache home {home}: {reason}", hint=HOME_HINT)
    if mine and st.st_mode & 0o077:
        if not _ours(home):  # never chmod a directory lbuild did not make (/tmp, $HOME, ...)
            raise StoreError(
                f"the cache home {home} is open to other users (mode "
                f"{st.st_mode & 0o7777:04o}) and holds files that are not lbuild's",
                hint="chmod 700 it, or set LBUILD_HOME (or --home) to a directory of its own",
            )
        try:
            os.chmod(home, 0o700)
        except OSError as e:
            raise StoreError(
                f"cannot make the cache home {home} private: {e.strerror or e}", hint=HOME_HINT
            ) from None
    return home


_HOME_ENTRIES = frozenset(
    {"lbuild.db", "lbuild.db-wal", "lbuild.db-shm", "lbuild.db-journal", "lock", "blobs", "tmp",
     "memo", "snapshots", "tarshapes", "tocs",
     "cache-mounts"}
)  # fmt: skip


def _ours(home: Path) -> bool:
    """Whether ``home`` is empty or holds only what lbuild puts in a cache home."""
    try:
        with os.scandir(home) as it:
            return all(
                e.name in _HOME_ENTRIES or e.name.startswith("lbuild.db.damaged-") for e in it
            )
    except OSError:
        return False


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextmanager
def lock_home(home: Path, *, exclusive: bool) -> Iterator[int]:
    """Hold the home's flock (shared for builds, exclusive for prune/verify); yields its fd."""
    import fcntl

    fd = os.open(Home(home).lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def start_writer(home: Path | None, *, fork: bool = False) -> Recorder | None:
    """Start the index writer child for a build in ``home`` ahead of everything else; None
    where a build writes inline (SQLAlchemy already imported: nothing to overlap).  Hand it
    to ``build(recorder=...)``, or ``abandon()`` it when no build follows.  ``fork``: made by
    forking this process (``Recorder.fork``: one that has everything imported already)."""
    if "sqlalchemy" in sys.modules:
        return None
    from cache.index.recorder import Recorder

    h = Home(ensure_home(home_dir(home)))
    if fork:
        return Recorder.fork(h.db, lock=h.lock)
    return Recorder.start(h.db, lock=h.lock)
