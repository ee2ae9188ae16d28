"""The overlay snapshotter: a committed snapshot is one overlayfs lowerdir (needs root)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from cache.errors import InvalidInput, NotFound, Unsupported
from cache.home import USED
from cache.layers.apply import apply_layer, remove_tree
from cache.layers.toc import dump_toc
from cache.layers.tocapply import apply_toc, toc_extractable
from cache.snapshots.base import Base, lock_fd
from cache.snapshots.diff import (
    Found,
    entry_of,
    finish,
    is_opaque,
    is_whiteout,
    same_meta,
    unchanged,
)
from cache.snapshots.mount import Mount, sys_mount, unmount
from cache.snapshots.reuse import (
    PATCH_MIN_ENTRIES,
    TOC_FILE,
    changes_between,
    patch_dir,
    read_record,
    shape_of,
    write_record,
)
from cache.types import Digest, Entry

# Overlay features that would put information into xattrs our diff does not read.
OVERLAY_OPTIONS = ("index=off", "metacopy=off", "redirect_dir=off")


class OverlaySnapshotter(Base):
    """Snapshots as overlayfs layers: a committed snapshot is one lowerdir (needs root).

    Layers of images are unpacked once each, by content, into ``root/layers/<name>/fs``
    (``ensure_layer``): ``name`` covers the layer's diff_id and the metadata its directory
    takes from below (the parent directories the layer does not carry, see
    ``cache.layers.apply.layer_parents``), so every chain holding the same layer on the same
    parent directories shares one directory, and an edit below a RUN unpacks only the layers
    whose content changed (and those, usually, by taking over their previous version's
    directory: ``cache.snapshots.reuse``).  The committed snapshot of a chain (named by its chain id) is
    then a *stack*: a ``parent`` file and a ``layer`` file naming the layer directory
    (``commit_stack``); ``meta.json`` next to each layer's ``fs`` records what it holds, for
    ``cache verify`` and the GC (``cache.snapshots.verify``).
    """

    overlay_layout = True

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # Layer directories this object's chains hold (``ensure_layer``, ``has_stack``):
        # never taken over for another layer (``cache.snapshots.reuse``).
        self._pinned: set[str] = set()
        # key -> fds of the shared locks on the layer directories its mounts show.
        self._uses: dict[str, list[int]] = {}

    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def fs_of(self, committed: Path) -> Path:
        """The lowerdir of committed snapshot directory ``committed``."""
        try:
            layer = (committed / "layer").read_text()
        except FileNotFoundError:
            return committed / "fs"
        return self.layers_dir / layer / "fs"

    @property
    def shapes_dir(self) -> Path:
        return self.root / "shapes"

    def has_stack(self, name: str) -> bool:
        """Whether committed stack ``name`` exists with its layer directory (another build
        may have taken that over, ``cache.snapshots.reuse``); the layer is then pinned."""
        try:
            layer = (self._cdir(name) / "layer").read_text()
        except FileNotFoundError:
            return self.exists(name)  # a committed snapshot of its own (no layer file)
        if not (self.layers_dir / layer / "fs").is_dir():
            return False
        self._pinned.add(layer)
        return True

    def ensure_layer(
        self,
        diff_id: Digest,
        parents: Mapping[str, Entry | None],
        open_layer: Callable[[Digest], BinaryIO],
        toc: Sequence[Entry] | None = None,
        *,
        reuse: bool = True,
    ) -> str:
        """The name of the layer directory holding ``diff_id`` on ``parents``; unpacked when
        missing: from its TOC ``toc`` when given (each file checked against the TOC's
        blake3, ``cache.layers.tocapply``), else from the tar stream (checked against its
        diff_id).  With ``reuse``, a missing directory is made from the directory of a layer
        of the same shape when there is one (``cache.snapshots.reuse``)."""
        name = layer_dir_name(diff_id, parents)
        final = self.layers_dir / name
        if (final / "fs").is_dir():
            self._pinned.add(name)
            return name
        self.layers_dir.mkdir(exist_ok=True)
        with self.name_lock("layer-" + name):
            if (final / "fs").is_dir():
                self._pinned.add(name)
                return name
            if final.exists():  # left without its files (no lbuild makes one so): made again
                self._trash(final)
            work = self._tmp / f"layer-{uuid.uuid4().hex}"
            work.mkdir()
            fd = lock_fd(work / "lock", blocking=True)
            shape = None
            toc_bytes = b""
            try:
                with open_layer(diff_id) as stream:
                    if toc is not None and toc_extractable(toc) and _has_fd(stream):
                        if len(toc) >= PATCH_MIN_ENTRIES:
                            shape = shape_of(toc, _parents_json(parents))
                            toc_bytes = dump_toc(toc)  # compared with the donor's, then kept
                        if not (
                            shape is not None
                            and reuse
                            and self._reuse(
                                shape, name, toc, stream.fileno(), work / "fs", toc_bytes
                            )
                        ):
                            apply_toc(
                                stream,
                                toc,
                                work / "fs",
                                name=f"layer {diff_id}",
                                overlay=True,
                                parents=parents,
                            )
                    else:
                        apply_layer(
                            stream,
                            work / "fs",
                            expected=diff_id,
                            name=f"layer {diff_id}",
                            overlay=True,
                            parents=parents,
                        )
                (work / "meta.json").write_text(layer_meta_json(diff_id, parents))
                if shape is not None and toc is not None:
                    (work / TOC_FILE).write_bytes(toc_bytes)
                (work / "lock").unlink()
                os.rename(work, final)
                self._pinned.add(name)
                if shape is not None:
                    write_record(self.shapes_dir / shape, name)
            except BaseException:
                remove_tree(work)
                raise
            finally:
                if fd is not None:
                    os.close(fd)
        return name

    def _reuse(
        self,
        shape: str,
        name: str,
        toc: Sequence[Entry],
        blob_fd: int,
        dest: Path,
        toc_bytes: bytes,
    ) -> bool:
        """Make ``dest`` from the directory of the layer recorded for ``shape`` (moved
        there and patched; see ``cache.snapshots.reuse``); False when there is none to take
        or it cannot become this layer's (``dest`` is then absent)."""
        donor = read_record(self.shapes_dir / shape)
        if donor is None or donor == name or donor in self._pinned:
            return False
        pairs = self._take(donor, toc, toc_bytes, dest)
        if pairs is None:
            return False
        try:
            patch_dir(dest, blob_fd, pairs, name=f"layer {name}")
        except (OSError, InvalidInput):
            remove_tree(dest)
            return False
        return True

    def _take(
        self, donor: str, toc: Sequence[Entry], toc_bytes: bytes, dest: Path
    ) -> list[tuple[Entry, Entry]] | None:
        """Move layer directory ``donor``'s files to ``dest`` and forget ``donor``, when
        it can become layer ``toc``'s: the entries to rewrite; None when it cannot be
        taken (missing, being made, shown by a mount, another shape)."""
        d = self.layers_dir / donor
        made = lock_fd(self.name_lock_path("layer-" + donor), blocking=False)
        if made is None:
            return None
        try:
            used = lock_fd(self._use_lock(donor), blocking=False)
            if used is None:
                return None
            try:
                try:
                    pairs = changes_between((d / TOC_FILE).read_bytes(), toc, toc_bytes)
                except OSError:
                    return None
                if pairs is None or not (d / "fs").is_dir():
                    return None
                # into our locked work directory whole (``donor`` is gone at once; a crash
                # from here leaves only that directory, which cleanup_stale removes)
                holder = dest.parent / "donor"
                os.rename(d, holder)
                os.rename(holder / "fs", dest)
                remove_tree(holder)
                return pairs
            finally:
                os.close(used)
        finally:
            os.close(made)

    def _use_lock(self, layer: str) -> Path:
        return self._locks_dir / f"use-{layer}.lock"

    def _new_active(self, key: str, parent: str | None, kind: str) -> Path:
        # Hold every layer directory the mounts will show (shared), so that none is taken
        # over while mounted; one already gone is NotFound (the caller makes the chain again).
        fds: list[int] = []
        try:
            for committed in self._chain(parent):
                try:
                    layer = (committed / "layer").read_text()
                except FileNotFoundError:
                    continue
                fd = lock_fd(self._use_lock(layer), blocking=True, shared=True)
                assert fd is not None
                fds.append(fd)
                if not (self.layers_dir / layer / "fs").is_dir():
                    raise NotFound(f"snapshot layer {layer[:16]} is gone (taken over or pruned)")
            d = super()._new_active(key, parent, kind)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._uses[key] = fds
        return d

    def _release(self, key: str) -> None:
        super()._release(key)
        for fd in self._uses.pop(key, []):
            os.close(fd)

    def commit_stack(self, name: str, parent: str | None, layer: str) -> None:
        """Commit snapshot ``name``: layer directory ``layer`` on committed ``parent``."""
        final = self._cdir(name)
        if final.exists():
            self.mark_used(name)
            return
        work = self._tmp / f"stack-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            if parent is not None:
                (work / "parent").write_text(parent)
            (work / "layer").write_text(layer)
            (work / USED).touch()
            os.rename(work, final)
        except OSError as exc:
            remove_tree(work)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise

    def _populate(self, d: Path, parent: str | None, kind: str) -> None:
        if kind == "active":
            (d / "fs").mkdir(mode=0o755)
            (d / "work").mkdir(mode=0o700)

    def mounts(self, key: str) -> list[Mount]:
        d, kind, parent = self._active_info(key)
        lowers = [str(self.fs_of(p)) for p in self._chain(parent)]
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
        lowers = [self.fs_of(p) for p in self._chain(parent)]
        out: list[Found] = []
        _OverlayDiff(d / "fs", lowers, out).walk("", hidden=False)
        return finish(out)


class _OverlayDiff:
    """Reads an overlayfs upperdir against its lowerdirs (see the module's diff rules)."""

    def __init__(self, upper: Path, lowers: list[Path], out: list[Found]) -> None:
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
                if is_whiteout(st):
                    return None
                if i == len(parts) - 1:
                    return cur
                if not stat.S_ISDIR(st.st_mode):
                    return None
                if is_opaque(cur):
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
            if is_whiteout(st):
                if low is not None:
                    self.out.append(Found(Entry(path=rel, type="whiteout", mode=0), None))
                    found = True
                continue
            if stat.S_ISDIR(st.st_mode):
                lst = os.lstat(low) if low is not None else None
                replaced = lst is not None and (is_opaque(path) or not stat.S_ISDIR(lst.st_mode))
                idx = len(self.out)
                if replaced or lst is None:
                    self.out.append(Found(entry_of(rel, path, st), st))
                    if replaced:
                        self.out.append(Found(Entry(path=rel, type="opaque", mode=0), None))
                    self.walk(rel, hidden=True)
                    found = True
                    continue
                assert low is not None
                self.out.append(Found(entry_of(rel, path, st), st))
                below = self.walk(rel, hidden=False)
                if below or not same_meta(path, st, low, lst):
                    found = True
                else:
                    del self.out[idx]
                continue
            if low is not None and unchanged(path, st, low, os.lstat(low)):
                continue
            self.out.append(Found(entry_of(rel, path, st), st))
            found = True
        return found



def overlay_works(root: Path) -> bool:
    """Whether an overlay mount with our options works under ``root`` (mounts and unmounts).

    A success is remembered in ``root/overlay-works`` for this kernel and filesystem, so
    later builds do not pay for the probe mount (0.05-0.2 s on a busy machine).
    """
    if os.geteuid() != 0:
        return False  # lowerdirs written outside a user namespace need real whiteout devices
    tmp = Path(root) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    memo = Path(root) / "overlay-works"
    stamp = f"{os.uname().release} {os.stat(root).st_dev}\n"
    try:
        if memo.read_text() == stamp:
            return True
    except OSError:
        pass
    if _probe(tmp):
        with contextlib.suppress(OSError):
            part = memo.with_name(f".overlay-works-{uuid.uuid4().hex}")
            part.write_text(stamp)
            os.replace(part, memo)
        return True
    return False


def _probe(tmp: Path) -> bool:
    probe = tmp / f"probe-{uuid.uuid4().hex}"
    probe.mkdir()
    fd = lock_fd(probe / "lock", blocking=True)
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



def _has_fd(stream: BinaryIO) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _entry_meta(e: Entry | None) -> list[object] | None:
    if e is None:
        return None
    return [e.mode, e.uid, e.gid, e.mtime, [[k, v.hex()] for k, v in sorted(e.xattrs)]]


def layer_meta_json(diff_id: Digest, parents: Mapping[str, Entry | None]) -> str:
    """What a layer directory holds: its diff_id and the parent directories it took from below."""
    doc = {"diff_id": diff_id, "parents": _parents_doc(parents)}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _parents_doc(parents: Mapping[str, Entry | None]) -> dict[str, list[object] | None]:
    return {p: _entry_meta(e) for p, e in sorted(parents.items())}


def _parents_json(parents: Mapping[str, Entry | None]) -> str:
    return json.dumps(_parents_doc(parents), sort_keys=True, separators=(",", ":"))


def layer_dir_name(diff_id: Digest, parents: Mapping[str, Entry | None]) -> str:
    """A layer directory's name: sha256 over what decides its content."""
    return hashlib.sha256(layer_meta_json(diff_id, parents).encode()).hexdigest()


def parents_from_meta(doc: Mapping[str, object]) -> dict[str, Entry | None]:
    """The ``parents`` of a layer directory's meta.json, as ``apply_layer`` takes them."""
    out: dict[str, Entry | None] = {}
    raw = doc.get("parents")
    assert isinstance(raw, dict)
    for p, m in raw.items():
        if m is None:
            out[p] = None
            continue
        mode, uid, gid, mtime, xattrs = m
        out[p] = Entry(
            path=p,
            type="dir",
            mode=mode,
            uid=uid,
            gid=gid,
            mtime=mtime,
            xattrs=tuple((k, bytes.fromhex(v)) for k, v in xattrs),
        )
    return out
