"""Committed snapshots checked against their layers' tables of contents, and their GC.

A committed snapshot never changes after it is committed, but "read-only" cannot be enforced
against root on the host (``chmod a-w`` does not stop root; immutable flags need
CAP_LINUX_IMMUTABLE and a filesystem that has them).  What lbuild promises instead:

- lbuild itself never writes a committed snapshot: a RUN writes only its own upperdir
  (overlay, where committed layer directories are lowerdirs, which overlayfs never writes)
  or its own copy (copy snapshotter); the home is private (0700), so no other user can;
- a snapshot is checked when it is made: the layer's bytes are hashed while they are
  extracted and must equal its diff_id;
- ``lbuild cache verify`` compares every committed snapshot with what its layers' tables of
  contents say it holds (type, permission bits, owner, size, blake3 of the content, link
  target, device numbers, times of files and directories, opaque markers) and finds every
  path that differs, is missing or is extra; an overlay layer directory that differs is
  extracted again under the same name, a copy snapshot that differs is removed with the
  snapshots made from it (the next RUN that needs it extracts it again).  xattrs other
  than overlayfs' own are not compared.

GC (``prune_snapshots``, run by ``lbuild cache prune``): a layer directory whose layer blob is
no longer in the store, or that no chain names any more, goes; so does every chain that
needs a removed or missing layer directory or snapshot, and every shape record
(``cache.snapshots.reuse``) that names a directory no longer there.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from cache.layers.apply import remove_tree
from cache.layers.view import View
from cache.snapshots.base import read_parent
from cache.snapshots.diff import blake3_file, is_opaque
from cache.snapshots.overlay import OverlaySnapshotter, parents_from_meta
from cache.snapshots.reuse import read_record
from cache.types import Digest, Entry

# A directory whose metadata the tables of contents do not give (a tar that names children
# of a directory but not the directory): only its type is checked.
_ANY = -1

TocOf = Callable[[Digest], Sequence[Entry] | None]


def expected_layer_dir(
    toc: Sequence[Entry], parents: dict[str, Entry | None]
) -> tuple[dict[str, Entry], set[str]]:
    """What an overlay layer directory holds: path -> entry, and its opaque directories."""
    out: dict[str, Entry] = {}
    opaque: set[str] = set()
    for p, e in parents.items():
        if p:
            out[p] = e if e is not None else Entry(path=p, type="dir", mode=0o755)
    for e in toc:
        if e.type == "opaque":
            opaque.add(e.path)
            out.setdefault(e.path, Entry(path=e.path, type="dir", mode=0o755))
        elif e.type == "whiteout":
            out[e.path] = Entry(path=e.path, type="char", mode=0, uid=e.uid, gid=e.gid)
        else:
            out[e.path] = e
    return _resolve_hardlinks(out), opaque


def expected_merged(tocs: Sequence[tuple[Digest, Sequence[Entry]]]) -> dict[str, Entry]:
    """What a full tree of a chain holds (copy snapshotter): path -> entry."""
    view = View()
    for diff_id, toc in tocs:
        view.apply(toc, diff_id)
    out: dict[str, Entry] = {}
    for e in view.walk(""):
        if view.get(e.path) is None:  # implicit directory
            e = Entry(path=e.path, type="dir", mode=_ANY)
        out[e.path] = e
    return _resolve_hardlinks(out)


def _resolve_hardlinks(out: dict[str, Entry]) -> dict[str, Entry]:
    for p, e in list(out.items()):
        if e.type == "hardlink":
            target = out.get(e.link)
            if target is not None and target.type == "file":
                out[p] = target  # one inode: the target's metadata and content
    return out


def compare_tree(fs: Path, expected: dict[str, Entry], opaque: set[str] | None = None) -> list[str]:
    """Paths under ``fs`` that differ from ``expected`` (missing and extra ones included),
    each with what differs, sorted."""
    opaque = opaque or set()
    check_owner = os.geteuid() == 0
    bad: list[str] = []
    seen: set[str] = set()
    for rel, st in _walk(fs):
        seen.add(rel)
        e = expected.get(rel)
        if e is None:
            bad.append(f"{rel}: not in the layers")
            continue
        why = _differs(fs / rel, st, e, check_owner)
        if not why and e.type == "dir" and (rel in opaque) != is_opaque(str(fs / rel)):
            why = "opaque marker"
        if why:
            bad.append(f"{rel}: {why}")
    bad += [f"{p}: missing" for p in expected if p not in seen]
    return sorted(bad)


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            for d in it:
                rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
                st = d.stat(follow_symlinks=False)
                yield rel, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)


_KIND = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}


def _differs(path: Path, st: os.stat_result, e: Entry, check_owner: bool) -> str:
    if stat.S_IFMT(st.st_mode) != _KIND.get(e.type):
        return f"type (want {e.type})"
    if e.mode == _ANY:
        return ""
    if e.type != "symlink" and stat.S_IMODE(st.st_mode) != e.mode:
        return f"mode {stat.S_IMODE(st.st_mode):o} (want {e.mode:o})"
    if check_owner and (st.st_uid, st.st_gid) != (e.uid, e.gid):
        return f"owner {st.st_uid}:{st.st_gid} (want {e.uid}:{e.gid})"
    if e.type in ("char", "block") and st.st_rdev != os.makedev(e.devmajor, e.devminor):
        return "device number"
    if e.type == "symlink":
        return "" if os.readlink(path) == e.link else "link target"
    if e.type in ("file", "dir") and int(st.st_mtime) != e.mtime:
        return f"mtime {int(st.st_mtime)} (want {e.mtime})"
    if e.type == "file":
        if st.st_size != e.size:
            return f"size {st.st_size} (want {e.size})"
        if e.digest and blake3_file(str(path)) != e.digest:
            return "content"
    return ""


# ---------------------------------------------------------------------------------------
# walking the snapshot roots
# ---------------------------------------------------------------------------------------
def _committed(root: Path) -> list[Path]:
    d = root / "committed"
    return sorted(d.iterdir()) if d.is_dir() else []


def _trash(root: Path, d: Path) -> None:
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    gone = tmp / f"trash-{uuid.uuid4().hex}"
    os.rename(d, gone)
    remove_tree(gone)


def _remove_with_descendants(root: Path, doomed: set[str]) -> list[str]:
    """Remove committed snapshots whose directory name is in ``doomed`` and every snapshot
    whose chain passes through one of them; return the names removed."""
    from urllib.parse import unquote

    dirs = {d.name: d for d in _committed(root)}
    parent_of: dict[str, str | None] = {}
    for enc, d in dirs.items():
        p = read_parent(d)
        parent_of[enc] = p
    by_name = {unquote(enc): enc for enc in dirs}
    removed: list[str] = []
    for enc in sorted(dirs):
        cur: str | None = enc
        hops = 0
        while cur is not None and cur not in doomed and hops <= len(dirs):
            parent = parent_of.get(cur)
            cur = by_name.get(parent) if parent is not None else None
            hops += 1
        if cur is not None and cur in doomed:
            _trash(root, dirs[enc])
            removed.append(unquote(enc))
    return removed


def _layer_dirs(root: Path) -> list[tuple[Path, dict[str, object]]]:
    out: list[tuple[Path, dict[str, object]]] = []
    d = root / "layers"
    if not d.is_dir():
        return out
    for child in sorted(d.iterdir()):
        try:
            meta = json.loads((child / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        out.append((child, meta))
    return out


def verify_snapshots(
    root: Path, toc_of: TocOf, open_layer: Callable[[Digest], BinaryIO]
) -> list[str]:
    """Check every committed snapshot under ``root`` (a home's ``snapshots/``) against its
    layers' tables of contents; repair what differs (see the module docstring).

    ``toc_of`` gives a layer's TOC, None when its blob is gone; returns one finding a line.
    """
    findings: list[str] = []
    overlay = root / "overlay"
    doomed: set[str] = set()
    for d, meta in _layer_dirs(overlay):
        diff_id = meta.get("diff_id")
        toc = toc_of(Digest(diff_id)) if isinstance(diff_id, str) else None
        if toc is None:
            _trash(overlay, d)
            doomed |= _stacks_on(overlay, d.name)
            findings.append(f"snapshot layer {d.name[:16]}: its layer is not in the store; removed")
            continue
        parents = parents_from_meta(meta)
        want, opaque = expected_layer_dir(toc, parents)
        bad = compare_tree(d / "fs", want, opaque)
        if not bad:
            continue
        _trash(overlay, d)
        OverlaySnapshotter(overlay).ensure_layer(Digest(str(diff_id)), parents, open_layer)
        findings.append(
            f"snapshot layer {diff_id}: {len(bad)} path(s) differ (first: {bad[0]}); "
            "extracted again"
        )
    if doomed:
        gone = _remove_with_descendants(overlay, doomed)
        findings += [f"snapshot {n}: needs a removed layer; removed" for n in gone]
    copy = root / "copy"
    doomed = set()
    for d in _committed(copy):
        try:
            chain = [Digest(x) for x in json.loads((d / "diff_ids").read_text())]
        except (OSError, ValueError):
            doomed.add(d.name)
            findings.append(f"snapshot {d.name}: does not say what it holds; removed")
            continue
        tocs = [(x, toc_of(x)) for x in chain]
        if any(t is None for _x, t in tocs):
            doomed.add(d.name)
            findings.append(f"snapshot {d.name}: a layer is not in the store; removed")
            continue
        want = expected_merged([(x, t) for x, t in tocs if t is not None])
        bad = compare_tree(d / "fs", want)
        if bad:
            doomed.add(d.name)
            findings.append(
                f"snapshot {chain[-1]} (copy): {len(bad)} path(s) differ (first: {bad[0]}); "
                "removed (extracted again when a RUN needs it)"
            )
    if doomed:
        _remove_with_descendants(copy, doomed)
    return findings


def _stack_layers(overlay: Path) -> dict[str, str]:
    """Committed stack directory name -> the layer directory it names."""
    out: dict[str, str] = {}
    for d in _committed(overlay):
        try:
            out[d.name] = (d / "layer").read_text()
        except FileNotFoundError:
            continue
    return out


def _stacks_on(overlay: Path, layer: str) -> set[str]:
    return {d for d, named in _stack_layers(overlay).items() if named == layer}


def prune_snapshots(root: Path, has_blob: Callable[[Digest], bool]) -> list[str]:
    """GC of ``root`` (a home's ``snapshots/``): layer directories whose blob is gone or that
    no chain names, and the chains that need them; returns what went."""
    out: list[str] = []
    overlay = root / "overlay"
    doomed: set[str] = set()
    for d, meta in _layer_dirs(overlay):
        diff_id = meta.get("diff_id")
        if not isinstance(diff_id, str) or not has_blob(Digest(diff_id)):
            doomed |= _stacks_on(overlay, d.name)
            _trash(overlay, d)
            out.append(f"snapshot layer {d.name[:16]}")
    # stacks naming a layer directory that is gone (taken over by an edit's layer,
    # cache.snapshots.reuse): a chain that needs one makes it again, so they are only
    # clutter, one or two per edit
    doomed |= {
        d
        for d, layer in _stack_layers(overlay).items()
        if not (overlay / "layers" / layer / "fs").is_dir()
    }
    if doomed:
        out += [f"snapshot {n}" for n in _remove_with_descendants(overlay, doomed)]
    named = set(_stack_layers(overlay).values())
    for d, _meta in _layer_dirs(overlay):
        if d.name not in named:
            _trash(overlay, d)
            out.append(f"snapshot layer {d.name[:16]} (unused)")
    shapes = overlay / "shapes"
    for record in sorted(shapes.iterdir()) if shapes.is_dir() else []:
        layer = read_record(record)
        if layer is None or not (overlay / "layers" / layer / "fs").is_dir():
            record.unlink(missing_ok=True)  # names a directory that went (reuse.py)
    copy = root / "copy"
    doomed = set()
    for d in _committed(copy):
        try:
            chain = [Digest(x) for x in json.loads((d / "diff_ids").read_text())]
        except (OSError, ValueError):
            continue  # made before snapshots said what they hold: kept
        if not all(has_blob(x) for x in chain):
            doomed.add(d.name)
    if doomed:
        out += [f"snapshot {n} (copy)" for n in _remove_with_descendants(copy, doomed)]
    return out
