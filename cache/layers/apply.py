"""The layer applier: extracts an uncompressed OCI layer tar onto a directory, verifying it.

Two targets are supported:

- a *merged tree* (``overlay=False``): ``dest`` already holds the lower layers' files (the copy
  snapshotter); OCI whiteouts are carried out: ``.wh.NAME`` deletes ``NAME`` and
  ``.wh..wh..opq`` removes everything in its directory that lower layers put there;
- an *overlay lowerdir* (``overlay=True``): ``dest`` starts empty and becomes one layer of an
  overlayfs stack, so whiteouts are written the way overlayfs reads them: ``NAME`` becomes a
  ``c 0 0`` character device and an opaque directory gets ``trusted.overlay.opaque=y``.

The sha256 of the tar is computed from the bytes as they are read (verification is a side
effect of doing the work, as in containerd's applier).  On a mismatch ``DigestMismatch`` is
raised *after* extraction, and ``dest`` is then garbage: the caller must not commit it.

Safety: member names are normalised; a ``..`` component, a path that passes through a
symlink (or a non-directory), or a hardlink to a path outside ``dest`` is an error.  Nothing is
ever written through a symlink: an existing symlink in the way of a member is replaced.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cache.errors import DigestMismatch, InvalidInput
from cache.types import Digest, Entry, sha256_digest

if TYPE_CHECKING:
    import tarfile

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_CHUNK = 1 << 20
# xattrs a layer must never be able to set: they steer overlayfs itself.
_FORBIDDEN_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


class _HashingReader:
    """A read-only stream wrapper that feeds every byte read to sha256."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to EOF so the digest covers the tar's trailing blocks and padding."""
        while self.read(_CHUNK):
            pass


def apply_layer(
    tar_stream: BinaryIO,
    dest: Path,
    *,
    expected: Digest | None = None,
    name: str = "layer",
    overlay: bool = False,
    parents: Mapping[str, Entry | None] | None = None,
) -> Digest:
    """Extract the uncompressed layer tar ``tar_stream`` onto ``dest``; return its sha256 digest.

    ``expected``: the layer's diff_id; a different digest raises ``DigestMismatch`` naming
    ``name``.  Bad members raise ``InvalidInput``.

    Directories the layer does not carry keep the metadata the lower layers gave them (as
    ``umoci unpack`` and containerd's applier do): on a merged tree the ones that exist keep
    their times although entries are made in them; on an overlay lowerdir, ``parents`` gives
    the lower layers' entry for each such directory (None or absent: 0755, root, time 0),
    see ``layer_parents``.
    """
    import tarfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    reader = _HashingReader(tar_stream)
    applier = _Applier(dest, name=name, overlay=overlay, parents=parents)
    try:
        try:
            tf = tarfile.open(fileobj=reader, mode="r|", errorlevel=2)  # type: ignore[call-overload]  # noqa: SIM115 (closed by the with below)
        except ValueError as exc:  # tarfile's int() of a bad PAX number in the first header
            raise InvalidInput(f"{name}: not a valid tar: {exc}") from None
        with tf:
            members = iter(tf)
            while True:
                try:
                    member = next(members)
                except StopIteration:
                    break
                except ValueError as exc:  # tarfile's int() of a bad PAX number (GNU.sparse.*)
                    raise InvalidInput(f"{name}: not a valid tar: {exc}") from None
                applier.apply(tf, member)
    except tarfile.TarError as exc:
        raise InvalidInput(f"{name}: not a valid tar: {exc}") from exc
    reader.drain()
    applier.finish()
    actual = sha256_digest(reader.hash.hexdigest())
    if expected is not None and actual != expected:
        raise DigestMismatch(name, expected, actual)
    return actual


def normalize_member_path(raw: str, *, name: str = "layer") -> str:
    """Return a tar member name as a clean relative path (``""`` is the root).

    Leading ``/`` and ``./`` are dropped; ``..`` anywhere is an error, and so is a NUL byte
    (a PAX path may hold one; no file system call takes it).
    """
    if "\0" in raw:
        raise InvalidInput(f"{name}: member {raw!r} has a NUL byte in its name")
    parts: list[str] = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise InvalidInput(f"{name}: member {raw!r} has a '..' component")
        parts.append(part)
    return "/".join(parts)


class _Applier:
    """Applies tar members one by one; remembers what this layer created (for opaque dirs)."""

    def __init__(
        self,
        dest: Path,
        *,
        name: str,
        overlay: bool,
        parents: Mapping[str, Entry | None] | None = None,
    ) -> None:
        self.dest = dest
        # ``dest`` as text: paths below it are joined with "/" (every member's path is
        # relative and checked; os.path.join on a Path cost ~2 us per call, 8,000 calls for
        # a 2,200-file layer)
        self.root = str(dest)
        self.name = name
        self.overlay = overlay
        self.parents = parents or {}
        self.is_root = os.geteuid() == 0
        # Paths this layer put in place: an opaque marker must not delete them.
        self.created: set[str] = set()
        # Directory times are set last: creating children changes a directory's mtime.
        self.dir_times: list[tuple[str, int]] = []
        # Directories this layer changes but does not carry: (atime, mtime) to give back.
        self.kept_times: dict[str, tuple[int, int]] = {}
        self.members: set[str] = set()
        # Directories (absolute paths) already checked to be real directories inside dest,
        # with every parent: later members below them skip the walk up (a layer of 2,000
        # files would lstat each parent of each file again).  ``_remove`` forgets a removed
        # path and everything below it.
        self.dirs_ok: set[str] = set()

    # -- helpers -------------------------------------------------------------------------
    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _keep_times(self, rel: str) -> None:
        """Remember directory ``rel``'s times before an entry is made or removed in it."""
        if rel in self.kept_times or rel in self.members:
            return
        try:
            st = os.lstat(self._abs(rel))
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.kept_times[rel] = (st.st_atime_ns, st.st_mtime_ns)

    def _make_parent(self, rel: str, path: str) -> None:
        """Create directory ``rel``, which the layer names no entry for, as the layers below
        have it (``parents``), else 0755 root at time 0."""
        os.mkdir(path, 0o700)
        e = self.parents.get(rel)
        if e is None or e.type != "dir":
            e = Entry(path=rel, type="dir", mode=0o755)
        self._chown(path, e.uid, e.gid)
        os.chmod(path, e.mode & 0o7777)
        self._set_xattrs(path, e.xattrs, rel)
        self.kept_times[rel] = (e.mtime * 1_000_000_000, e.mtime * 1_000_000_000)

    def _check_parents(self, rel: str, raw: str) -> None:
        """Make sure every parent of ``rel`` is a real directory inside dest (create if missing)."""
        parent_rel = rel.rpartition("/")[0]
        if parent_rel and f"{self.root}/{parent_rel}" in self.dirs_ok:
            return
        parts = rel.split("/")[:-1]
        cur = self.root
        cur_rel = ""
        self._keep_times("")
        for part in parts:
            cur = f"{cur}/{part}"
            cur_rel = f"{cur_rel}/{part}" if cur_rel else part
            if cur in self.dirs_ok:
                continue
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                self._make_parent(cur_rel, cur)
                self.dirs_ok.add(cur)
                continue
            self._keep_times(cur_rel)
            if stat.S_ISLNK(st.st_mode):
                raise InvalidInput(f"{self.name}: member {raw!r} passes through a symlink")
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidInput(f"{self.name}: member {raw!r} passes through a non-directory")
            self.dirs_ok.add(cur)

    def _forget_dirs(self, path: str) -> None:
        """``path`` is about to be removed or replaced: it and what is below it are no
        longer known directories."""
        if path in self.dirs_ok:
            below = path + "/"
            self.dirs_ok = {d for d in self.dirs_ok if d != path and not d.startswith(below)}

    def _remove(self, path: str) -> None:
        self._forget_dirs(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(Path(path))
        else:
            os.unlink(path)

    # -- members -------------------------------------------------------------------------
    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = normalize_member_path(m.name, name=self.name)
        if not rel:
            # The root itself: only its metadata (docker writes "./" in some layers).
            if m.isdir():
                self.members.add(rel)
                self.kept_times.pop(rel, None)
                self._set_meta(rel, m)
            return
        base = rel.rpartition("/")[2]
        self._check_parents(rel, m.name)
        if base == OPAQUE_MARKER:
            self._opaque(rel.rpartition("/")[0])
            return
        if base.startswith(WHITEOUT_PREFIX):
            target = rel[: len(rel) - len(base)] + base[len(WHITEOUT_PREFIX) :]
            self._whiteout(target, m)
            return
        path = self._abs(rel)
        if m.isdir():
            self.members.add(rel)
            self.kept_times.pop(rel, None)
            _ensure_dir(path, 0o700)
        else:
            self._remove(path)
            if m.isreg():
                self._write_file(tf, m, path)
            elif m.issym():
                if not m.linkname:  # symlink(2) refuses an empty target (ENOENT)
                    raise InvalidInput(f"{self.name}: symlink {rel} has an empty target")
                if "\0" in m.linkname:
                    raise InvalidInput(f"{self.name}: symlink {rel} has a NUL byte in its target")
                os.symlink(m.linkname, path)
            elif m.islnk():
                self._hardlink(m, path)
                self.created.add(rel)
                return  # a hardlink shares its target's metadata
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            elif m.isfifo():
                os.mkfifo(path, 0o600)
            else:
                raise InvalidInput(
                    f"{self.name}: member {m.name!r} has unsupported type {m.type!r}"
                )
        self.created.add(rel)
        self._set_meta(rel, m)

    def _write_file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> None:
        src = tf.extractfile(m)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if src is None:
                return
            remaining = m.size
            while remaining > 0:
                chunk = src.read(min(_CHUNK, remaining))
                if not chunk:
                    raise InvalidInput(f"{self.name}: member {m.name!r} is truncated")
                out.write(chunk)
                remaining -= len(chunk)

    def _hardlink(self, m: tarfile.TarInfo, path: str) -> None:
        target_rel = normalize_member_path(m.linkname, name=self.name)
        if not target_rel:
            raise InvalidInput(f"{self.name}: hardlink {m.name!r} points at the root")
        self._check_parents(target_rel, m.linkname)
        target = self._abs(target_rel)
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise InvalidInput(
                f"{self.name}: hardlink {m.name!r} -> {m.linkname!r}: target does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{self.name}: hardlink {m.name!r} points at a directory")
        # follow_symlinks=False: a hardlink to a symlink links the symlink itself.
        os.link(target, path, follow_symlinks=False)

    def _whiteout(self, target_rel: str, m: tarfile.TarInfo) -> None:
        if not target_rel.rpartition("/")[2]:
            raise InvalidInput(f"{self.name}: bad whiteout {m.name!r}")
        path = self._abs(target_rel)
        if self.overlay:
            self._remove(path)
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            self._chown(path, m.uid, m.gid)
            return
        if target_rel in self.created:
            return  # a whiteout only hides what lower layers had
        self._remove(path)

    def _opaque(self, dir_rel: str) -> None:
        path = self._abs(dir_rel)
        if _ensure_dir(path, 0o755):
            self.created.add(dir_rel)
        if self.overlay:
            os.setxattr(path, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
            return
        prefix = dir_rel + "/" if dir_rel else ""
        for child in os.listdir(path):
            if prefix + child not in self.created:
                self._remove(os.path.join(path, child))

    # -- metadata ------------------------------------------------------------------------
    def _chown(self, path: str, uid: int, gid: int) -> None:
        from cache.layers.tarread import owner_in_range

        if not owner_in_range(uid, gid):
            raise InvalidInput(f"{self.name}: owner {uid}:{gid} is out of range")
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except PermissionError:
            if self.is_root:
                raise
            # Unprivileged: ownership cannot be kept; the user namespace maps it later.

    def _set_meta(self, rel: str, m: tarfile.TarInfo) -> None:
        from cache.layers.tarread import mtime_in_range

        path = self._abs(rel)
        if not mtime_in_range(m.mtime):
            raise InvalidInput(
                f"{self.name}: member {m.name!r} has a modification time out of range"
            )
        self._chown(path, m.uid, m.gid)
        if not m.issym():
            # chmod after chown: chown clears setuid/setgid bits.
            os.chmod(path, m.mode & 0o7777)
        self._set_xattrs(path, member_xattrs(m), m.name)
        mtime_ns = int(m.mtime * 1_000_000_000)
        if m.isdir():
            self.dir_times.append((path, mtime_ns))
        else:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def _set_xattrs(self, path: str, xattrs: Iterable[tuple[str, bytes]], shown: str) -> None:
        for key, value in xattrs:
            if key.startswith(_FORBIDDEN_XATTR_PREFIXES):
                continue
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except PermissionError as exc:
                if self.is_root:  # e.g. a user.* xattr on a device node: Linux has no such thing
                    raise InvalidInput(
                        f"{self.name}: cannot set xattr {key!r} on {shown!r}: {exc.strerror}"
                    ) from exc
            except OSError as exc:
                raise InvalidInput(
                    f"{self.name}: cannot set xattr {key!r} on {shown!r}: {exc.strerror}"
                ) from exc

    def finish(self) -> None:
        """Set directory times, deepest first; give the directories the layer does not carry
        their times back."""
        for path, mtime_ns in reversed(self.dir_times):
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        for rel, (atime_ns, mtime_ns) in self.kept_times.items():
            if rel in self.members:
                continue
            try:
                os.utime(self._abs(rel), ns=(atime_ns, mtime_ns), follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed by a later member (a whiteout of the directory)


def member_xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The extended attributes a tar member carries in its PAX header (SCHILY or LIBARCHIVE)."""
    import base64

    out: list[tuple[str, bytes]] = []
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it for raw bytes.
            out.append((key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            out.append((key[len("LIBARCHIVE.xattr.") :], base64.b64decode(value)))
    return sorted(out)


def remove_tree(path: Path) -> None:
    """Remove a directory tree, also when some of its directories are read-only (not root)."""
    import shutil

    if os.geteuid() != 0:
        # A read-only directory (0555) refuses unlinking its children: open them up first.
        for root, dirs, _files in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return


def _ensure_dir(path: str, mode: int) -> bool:
    """Make ``path`` a directory (replacing a non-directory); True if it had to be made."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            return False
        os.unlink(path)
    os.mkdir(path, mode)
    return True


def layer_parents(
    toc: Iterable[Entry], lower: Callable[[str], Entry | None]
) -> dict[str, Entry | None]:
    """The directories a layer needs but does not carry, each with the entry the layers below
    give it (``lower``: a merged view's lookup; None when they have no directory there).
    What ``apply_layer(..., parents=...)`` takes for an overlay lowerdir.

    The root is not one of them unless the layer makes it opaque: a layer directory's root is
    never made from an entry (nothing of the layers below enters it), so a layer that carries
    every other parent of its entries (a COPY's layer does) makes the same directory on any
    layers, and ``lower`` is not asked at all."""
    carried: set[str] = set()
    needed: set[str] = set()
    parents: set[str] = set()  # each entry's parent directory; their parents follow below
    for e in toc:
        if e.type == "dir":
            carried.add(e.path)
        elif e.type == "opaque":
            needed.add(e.path)
        parents.add(e.path.rpartition("/")[0])
    for p in parents:
        while p and p not in needed:
            needed.add(p)
            p = p.rpartition("/")[0]
    out: dict[str, Entry | None] = {}
    for p in sorted(needed - carried):
        low = lower(p)
        out[p] = low if low is not None and low.type == "dir" else None
    return out
