"""The build context: what COPY/ADD sources select in it, walking it, and hashing its files.

Vocabulary: a *rel* path is relative to the context root, '/'-separated, with no leading
``./`` or ``/``; the root itself is ``"."``.  A *logical* rel is a path as a Dockerfile
names it (it may pass through symlinks); its *real* rel is where it lands once those
symlinks are resolved inside the context.  Ignore rules always apply to real rels, since
Docker filters the context before COPY follows any link.  An excluded path is treated as
absent, except a directory that still holds re-included (``!``) paths: Docker sends such a
directory so that its surviving children have a parent.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal

from builder.frontend.dockerignore import (
    IgnoreRules,
    PatternSyntaxError,
    compile_segment,
    go_clean,
    has_wildcards,
)
from builder.plan.listing import list_dir
from cache.errors import InvalidInput, LbuildError, NotFound
from cache.types import direct_init

ContextFileType = Literal["file", "dir", "symlink", "fifo"]

FileHasher = Callable[[str, os.stat_result], str]
"""Returns the blake3 hex of a regular file's content, given its path and a fresh stat."""

_READ_CHUNK = 1 << 20
_SKIPPED_XATTRS = frozenset({"security.selinux"})
_MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS: a loop fails instead of spinning


@direct_init
@dataclass(frozen=True)
class ContextFile:
    """One path of the build context as COPY/ADD sees it.

    ``rel`` is the logical rel path (for a followed top-level symlink, the link's own path);
    ``type``/``mode``/``size``/... describe what is there (the link's target when followed).
    ``mode`` holds permission bits only (``0o7777``); ``size`` is 0 for directories and the
    target's byte length for symlinks; ``link`` is a symlink's target as stored ('' otherwise).
    """

    rel: str
    type: ContextFileType
    mode: int
    size: int
    mtime_ns: int
    ino: int
    dev: int
    nlink: int
    link: str = ""
    # The stat this row was made from (what the stat index compares): saves a second lstat.
    stat: os.stat_result | None = field(default=None, compare=False, repr=False)
    # Where a followed top-level symlink landed (its real rel; '' when ``rel`` is real): the
    # file that is opened, without following links, to hash and copy it.
    real: str = field(default="", compare=False, repr=False)

    @property
    def parts(self) -> tuple[str, ...]:
        """The rel path as a tuple of components: the sort key of context paths."""
        return () if self.rel == "." else tuple(self.rel.split("/"))


class _OutsideContext(Exception):
    """A symlink being followed leads out of the context (internal: callers word the error)."""

    def __init__(self, link: str, target: str) -> None:
        super().__init__(f"symlink {link} -> {target}")
        self.link = link
        self.target = target


def _join(parent: str, name: str) -> str:
    """Join a rel directory and a name."""
    return name if parent == "." else f"{parent}/{name}"


def _make_file(rel: str, st: os.stat_result, link: str = "") -> ContextFile | None:
    """Build a ContextFile from a stat result; None for sockets and devices."""
    fmt = stat.S_IFMT(st.st_mode)
    kind: ContextFileType
    if fmt == stat.S_IFREG:
        kind, size = "file", st.st_size
    elif fmt == stat.S_IFDIR:
        kind, size = "dir", 0
    elif fmt == stat.S_IFLNK:
        kind, size = "symlink", len(os.fsencode(link))
    elif fmt == stat.S_IFIFO:  # copied as a fifo, as BuildKit does
        kind, size = "fifo", 0
    else:
        return None
    return ContextFile(
        rel=rel,
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        size=size,
        mtime_ns=st.st_mtime_ns,
        ino=st.st_ino,
        dev=st.st_dev,
        nlink=st.st_nlink,
        link=link if kind == "symlink" else "",
        stat=st,
    )


def _unescape(segment: str) -> str:
    """Drop Go pattern escapes from a segment that holds no wildcard."""
    return re.sub(r"\\(.)", r"\1", segment, flags=re.DOTALL)


class BuildContext:
    """The directory sent to a build, filtered by its ignore rules.

    Nothing outside ``root`` is ever read: symlinks are resolved component by component and
    one that leaves the context is an error, never followed.
    """

    def __init__(
        self,
        root: Path,
        ignore: IgnoreRules,
        scans: dict[str, list[tuple[str, os.stat_result]]] | None = None,
    ) -> None:
        """``scans``: directory listings already taken (real rel -> sorted (name, lstat)),
        e.g. by the no-op probe a moment ago; a directory not in it is listed here."""
        try:
            st = root.stat()
        except OSError:
            raise NotFound(f"build context not found: {root}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise NotFound(f"build context is not a directory: {root}")
        self.root: Path = root.resolve()
        self.ignore: IgnoreRules = ignore
        self._root_str = str(self.root)
        self._scans = scans if scans is not None else {}

    def _host(self, real: str) -> str:
        """The host path of a real rel."""
        return self._root_str if real == "." else os.path.join(self._root_str, real)

    def _resolve(self, logical: str) -> tuple[str, os.stat_result] | None:
        """Resolve a logical rel inside the context, following every symlink in it.

        Returns its real rel and lstat, or None when a component is missing, is not a
        directory, or is a symlink the ignore rules exclude.  Raises _OutsideContext when a
        link leaves the root (an absolute target, or ".." above it).
        """
        parts = deque(p for p in logical.split("/") if p not in ("", "."))
        real: list[str] = []
        hops = 0
        followed = ("", "")  # the last symlink followed: the culprit when ".." climbs out
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue  # from a link target such as "./x" or "a//b"
            if name == "..":
                if not real:
                    raise _OutsideContext(*followed)
                real.pop()
                continue
            cand = _join("/".join(real) or ".", name)
            try:
                st = os.lstat(self._host(cand))
            except (FileNotFoundError, NotADirectoryError):
                return None
            except OSError as err:
                raise InvalidInput(f"cannot read {cand}: {err.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                if self.ignore.excluded(cand):
                    return None
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise InvalidInput(f"{logical}: too many levels of symbolic links")
                target = _readlink(self._host(cand))
                if target is None:
                    return None  # removed since the lstat
                if target.startswith("/"):
                    raise _OutsideContext(cand, target)
                followed = (cand, target)
                parts.extendleft(reversed(target.split("/")))
                continue
            real.append(name)
        real_rel = "/".join(real) or "."
        try:
            return real_rel, os.lstat(self._host(real_rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _has_included(self, real: str) -> bool:
        """Whether an excluded directory still holds a path that the rules re-include."""
        rules = self.ignore
        state = rules.state(real)
        if not rules.may_include_below_from(real, state):
            return False
        return next(self._walk_dir(real, real, state, []), None) is not None

    def _lookup(
        self, logical: str, *, strict: bool, instruction: str, source: str
    ) -> ContextFile | None:
        """The ContextFile a logical rel names (top-level symlinks followed), or None if absent.

        With ``strict`` a special file (socket, fifo, device) is an error; otherwise absent.
        """
        try:
            found = self._resolve(logical)
        except _OutsideContext as err:
            raise InvalidInput(
                f"{instruction} source {source} points outside the build context ({err})"
            ) from None
        if found is None:
            return None
        real, st = found
        cf = _make_file(logical, st)
        if cf is None:
            if strict:
                raise InvalidInput(
                    f"{instruction} source {logical} is not a regular file, directory, "
                    "symlink or fifo"
                )
            return None
        if self.ignore.excluded(real) and not (cf.type == "dir" and self._has_included(real)):
            return None
        if real != logical and real != cf.rel:
            cf = replace(cf, real=real)
        return cf

    def _clean_source(self, source: str) -> str:
        """Clean a source path against the context root, as BuildKit does (``fs.RootPath``).

        ``/present.txt`` and ``../present.txt`` both name ``present.txt`` at the root: a path
        can never climb out lexically.  (A symlink pointing outside stays an error.)
        """
        cleaned = go_clean("/" + source).lstrip("/")
        return cleaned or "."

    def select(
        self,
        source: str,
        *,
        file: str | None = None,
        line: int | None = None,
        instruction: str = "COPY",
    ) -> list[ContextFile]:
        """Return the top-level items one COPY/ADD source selects, sorted by path components.

        ``source`` is already variable-expanded.  ``"."`` selects the context root as a
        directory.  Wildcards follow Go's ``filepath.Match`` per segment and only match paths
        the ignore rules keep.  Errors carry ``file``/``line``: NotFound when nothing matches,
        InvalidInput for a source outside the context or a malformed pattern.
        """
        try:
            cleaned = self._clean_source(source)
            if has_wildcards(cleaned):
                found = self._glob(cleaned, instruction=instruction, source=source)
            else:
                one = self._lookup(cleaned, strict=True, instruction=instruction, source=source)
                found = [] if one is None else [one]
        except InvalidInput as err:
            if err.file is None:
                err.file, err.line = file, line
            raise
        if not found:
            hint = None
            if not has_wildcards(cleaned) and self._resolve(cleaned) is not None:
                hint = "the path is excluded by the .dockerignore rules"
            raise NotFound(
                f"{instruction} source not found: {source}", hint=hint, file=file, line=line
            )
        return sorted(found, key=lambda f: f.parts)

    def _glob(self, pattern: str, *, instruction: str, source: str) -> list[ContextFile]:
        """Expand a wildcard source: a literal prefix, then one directory listing per segment."""
        segments = pattern.split("/")
        first = next(i for i, seg in enumerate(segments) if has_wildcards(seg))
        candidates = ["/".join(segments[:first]) or "."]
        for seg in segments[first:]:
            if not has_wildcards(seg):
                literal = _unescape(seg)
                candidates = [_join(c, literal) for c in candidates]
                continue
            try:
                regex = compile_segment(seg)
            except PatternSyntaxError as err:
                raise InvalidInput(f"bad {instruction} source pattern {source!r}: {err}") from None
            expanded: list[str] = []
            for cand in candidates:
                expanded.extend(_join(cand, n) for n in self._listdir(cand) if regex.fullmatch(n))
            candidates = expanded
        found: list[ContextFile] = []
        for cand in candidates:
            cf = self._lookup(cand, strict=False, instruction=instruction, source=source)
            if cf is not None:
                found.append(cf)
        return found

    def _listdir(self, logical: str) -> list[str]:
        """Names in a logical directory (symlinks followed), sorted; [] when it is not one."""
        try:
            found = self._resolve(logical)
        except _OutsideContext:
            return []  # _lookup reports the escape when a matched path goes through it
        if found is None or not stat.S_ISDIR(found[1].st_mode):
            return []
        try:
            return sorted(os.listdir(self._host(found[0])))
        except OSError as err:
            raise InvalidInput(f"cannot read directory {logical}: {err.strerror}") from None

    def walk(self, rel_dir: str) -> Iterator[ContextFile]:
        """Yield everything below a selected directory (not the directory itself).

        Depth-first, sorted by path components; excluded paths are skipped, except a
        directory holding re-included paths, which comes just before its first survivor.
        Symlinks are yielded as symlinks, never followed; sockets, fifos and devices are
        skipped.  An unreadable directory raises InvalidInput naming it.
        """
        logical = self._clean_source(rel_dir or ".")
        try:
            found = self._resolve(logical)
        except _OutsideContext as err:
            raise InvalidInput(f"{rel_dir} points outside the build context ({err})") from None
        if found is None:
            raise NotFound(f"{rel_dir}: no such directory in the build context")
        real, st = found
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"{rel_dir} is not a directory")
        rules = self.ignore
        state = (False,) * len(rules.patterns) if real == "." else rules.state(real)
        yield from self._walk_dir(real, logical, state, [])

    def _walk_dir(
        self, real: str, logical: str, state: tuple[bool, ...], pending: list[ContextFile]
    ) -> Iterator[ContextFile]:
        """Walk one directory; ``pending`` holds excluded ancestors not yet yielded.

        Iterative (a stack of open listings), so a context thousands of directories deep
        walks like a flat one (no RecursionError)."""
        rules = self.ignore
        Frame = tuple[
            str, str, tuple[bool, ...], Iterator[tuple[str, os.stat_result]], ContextFile | None
        ]
        # (real, logical, state, entries left, the excluded dir this frame put on pending)
        stack: list[Frame] = [(real, logical, state, iter(self._scan(real, logical)), None)]
        while stack:
            real, logical, state, entries, marker = stack[-1]
            nxt = next(entries, None)
            if nxt is None:
                stack.pop()
                if marker is not None and pending and pending[-1] is marker:
                    pending.pop()  # nothing below survived: the excluded dir is not sent
                continue
            name, st = nxt
            child_real = _join(real, name)
            child_logical = _join(logical, name)
            child_state = rules.child_state(state, child_real)
            excluded = rules.excluded_by(child_state)
            link = ""
            if stat.S_ISLNK(st.st_mode):
                if excluded:
                    continue
                target = _readlink(self._host(child_real))
                if target is None:
                    continue  # removed since the scan
                link = target
            cf = _make_file(child_logical, st, link)
            if cf is None:
                continue
            if cf.type != "dir":
                if not excluded:
                    yield from pending
                    pending.clear()
                    yield cf
                continue
            if excluded:
                # Descend only when a '!' pattern could bring something back below.
                if not rules.may_include_below_from(child_real, child_state):
                    continue
                pending.append(cf)
            else:
                yield from pending
                pending.clear()
                yield cf
            below = iter(self._scan(child_real, child_logical))
            stack.append((child_real, child_logical, child_state, below, cf if excluded else None))

    def _scan(self, real: str, logical: str) -> list[tuple[str, os.stat_result]]:
        """The (name, lstat) of a directory's entries, sorted by name."""
        known = self._scans.get(real)
        if known is not None:
            return known
        try:
            return list_dir(self._host(real))
        except OSError as err:
            raise InvalidInput(f"cannot read directory {logical}: {err.strerror}") from None

    def xattrs(self, f: ContextFile) -> tuple[tuple[str, bytes], ...]:
        """The extended attributes of a selected path (file capabilities, user.*, ...), sorted;
        kept in its layer entry as buildah and BuildKit keep them.  ``security.selinux`` is
        left out (a label of this host, not of the file); so is every xattr of a symlink."""
        if f.type == "symlink":
            return ()
        rel = f.real or f.rel
        path = self._root_str if rel in ("", ".") else os.path.join(self._root_str, rel)
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as err:
            if err.errno in (errno.ENOTSUP, errno.ENOENT):
                return ()
            raise InvalidInput(
                f"cannot read extended attributes of {f.rel}: {err.strerror}"
            ) from None
        out: list[tuple[str, bytes]] = []
        for name in sorted(names):
            if name in _SKIPPED_XATTRS:
                continue
            try:
                out.append((name, os.getxattr(path, name, follow_symlinks=False)))
            except OSError as err:
                if err.errno == errno.ENODATA:  # removed since the listing
                    continue
                raise InvalidInput(
                    f"cannot read extended attribute {name} of {f.rel}: {err.strerror}"
                ) from None
        return tuple(out)

    def open(self, f: ContextFile) -> BinaryIO:
        """Open a selected regular file for reading; InvalidInput when it cannot be read."""
        if f.type != "file":
            raise InvalidInput(f"cannot read {f.rel}: not a regular file")
        try:
            found = self._resolve(f.rel)
        except _OutsideContext as err:
            raise InvalidInput(f"{f.rel} points outside the build context ({err})") from None
        if found is None:
            raise NotFound(f"cannot read {f.rel}: No such file or directory")
        # O_NOFOLLOW: the path was resolved above; a link swapped in since must not be followed.
        # O_NONBLOCK: a fifo swapped in must not hang the build.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self._host(found[0]), flags)
        except OSError as err:
            raise InvalidInput(f"cannot read {f.rel}: {err.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidInput(f"cannot read {f.rel}: not a regular file")
        return os.fdopen(fd, "rb")


def _readlink(path: str) -> str | None:
    """The target of what an lstat just saw as a symlink; None when it is gone since.  A
    file renamed over it since is "file changed while being read" (exit 1), not bad input."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.EINVAL:  # not a symlink any more
            raise LbuildError(f"file changed while being read: {path}") from None
        raise


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""How a context file is opened for reading: never through a symlink swapped in since the walk
(O_NOFOLLOW), never hanging on a fifo swapped in (O_NONBLOCK)."""


def open_verified(path: str | os.PathLike[str], st: os.stat_result | None) -> int:
    """Open a context file the walk saw as ``st`` (its lstat) and return the descriptor.

    The file is opened without following a symlink in its last component, and the open file
    must be a regular file with the walk's device and inode: a path swapped for a symlink
    (or a parent directory swapped for one) since the walk is "file changed while being
    read" (exit 1), never the bytes of whatever the link points at.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise InvalidInput(f"cannot read {os.fsdecode(path)}: not a regular file")
        if st is not None and (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise LbuildError(f"file changed while being read: {os.fsdecode(path)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


_CHUNK = 1 << 20
_buffers = threading.local()


def _buffer() -> bytearray:
    """This thread's read buffer for large files (``_CHUNK`` bytes, made on first use)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(_CHUNK)
    return buf


def hash_file(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str:
    """Return the blake3 hex of a regular file's content, streamed, never held in memory.

    ``st`` is the walk's lstat of ``path``: the file is opened once without following
    symlinks and must still be that file (``open_verified``).  It is read to its end, whatever
    its size now, in 1 MiB reads into a buffer the thread keeps (a zeroed buffer per file, or
    16 MiB ones for large files hashed on blake3's threads, cost more than reading and hashing
    them).  Raises InvalidInput when the file cannot be read, LbuildError when it was replaced
    since ``st`` was taken.
    """
    digest = _hash(path, st, wait=True)
    assert digest is not None
    return digest


def hash_file_if_cached(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
    """``hash_file``, or None when the file's first bytes are not in the page cache (reading
    them would wait for the disk: ``RWF_NOWAIT``) or its filesystem cannot say (then its
    other files are not asked either).

    A batch of files is hashed on this thread when they are cached (on threads, the GIL made
    2,000 small cached files 2-3x slower to hash than one after another) and the rest on
    threads that wait for the disk side by side (``CachedHasher.many``).  Same errors as
    ``hash_file``."""
    return _hash(path, st, wait=False)


_CANNOT_TELL = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})
"""What ``preadv(RWF_NOWAIT)`` raises where the filesystem cannot say (overlayfs: EOPNOTSUPP)."""
_cannot_tell: set[int] = set()
"""Devices (``st_dev``) whose files are not asked again (each ask costs an open and a close)."""


def _hash(path: str | os.PathLike[str], st: os.stat_result | None, *, wait: bool) -> str | None:
    import blake3

    if not wait and st is not None and st.st_dev in _cannot_tell:
        return None
    try:
        fd = open_verified(path, st)
        try:
            buf = _buffer()
            view = memoryview(buf)
            hasher = blake3.blake3()
            offset = 0
            if not wait:
                try:
                    offset = os.preadv(fd, (buf,), 0, os.RWF_NOWAIT)
                except BlockingIOError:
                    return None
                except OSError as err:
                    if err.errno not in _CANNOT_TELL:
                        raise
                    if st is not None:
                        _cannot_tell.add(st.st_dev)
                    return None
                if offset == 0:  # empty
                    return str(hasher.hexdigest())
                hasher.update(view[:offset])
            while n := os.preadv(fd, (buf,), offset):
                hasher.update(view[:n])
                offset += n
        finally:
            os.close(fd)
        return str(hasher.hexdigest())
    except FileNotFoundError:
        raise NotFound(f"cannot read {os.fsdecode(path)}: No such file or directory") from None
    except OSError as err:
        if err.errno == errno.ELOOP:  # a symlink where the walk saw a file
            raise LbuildError(f"file changed while being read: {os.fsdecode(path)}") from None
        raise InvalidInput(f"cannot read {os.fsdecode(path)}: {err.strerror or err}") from None
