"""What a user sees and manages in the cache home: ``cache ls|du|prune`` and
``images|tag|rmi``, as functions that return plain data (builder.cli prints).

Disk use is counted from the files on disk, by kind (the home's layout is
:class:`cache.home.Home`'s):

- ``blobs``: the content store (layers, TOCs, compressed layers, configs, manifests);
- ``snapshots``: committed snapshots RUN steps run on (derived from layers, rebuilt on demand);
- ``cache-mounts``: ``RUN --mount=type=cache`` directories;
- ``tmp``: in-flight work and what killed builds left (``tmp/``, active and half-made snapshots);
- ``db``: the index (SQLite with its WAL); ``memo``: no-op memos; ``other``: anything else.

A file with several hard links is counted once.  ``cache prune`` works under the home's
exclusive lock, so no build is running: everything under ``tmp`` is a leftover.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.plan.keys import LAYER_OP
from cache.errors import InvalidInput, NotFound
from cache.home import USED, Home, last_used, mount_marker

if TYPE_CHECKING:
    from cache.index.records import StepRecord, TagRecord
    from cache.session import Session
    from cache.types import Digest

KINDS = ("blobs", "snapshots", "cache-mounts", "tmp", "db", "memo", "other")
_SNAPSHOT_TMP_AREAS = ("active", "tmp", "locks")


# ---------------------------------------------------------------------------------------
# disk use
# ---------------------------------------------------------------------------------------
@dataclass
class Usage:
    """Bytes (apparent sizes of non-directories) and file counts, by kind."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    files: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def _kind(rel: tuple[str, ...]) -> str:
    top = rel[0]
    if top == "blobs":
        return "blobs"
    if top == "snapshots":
        # snapshots/<overlay|copy>/<committed|active|tmp|locks>/...
        return "tmp" if len(rel) > 2 and rel[2] in _SNAPSHOT_TMP_AREAS else "snapshots"
    if top == "cache-mounts":
        return "cache-mounts"
    if top == "tmp":
        return "tmp"
    if top.startswith("lbuild.db"):
        return "db"
    if top == "memo":
        return "memo"
    return "other"


def _files(root: Path) -> Iterator[tuple[tuple[str, ...], os.stat_result]]:
    """Every non-directory under ``root`` (symlinks not followed), relative path parts."""
    stack: list[tuple[str, tuple[str, ...]]] = [(str(root), ())]
    while stack:
        path, rel = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                parts = (*rel, e.name)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((e.path, parts))
                else:
                    yield parts, st


def disk_usage(home: Path) -> Usage:
    """What the home weighs on disk, by kind (hard links counted once)."""
    u = Usage()
    seen: set[tuple[int, int]] = set()
    for rel, st in _files(home):
        if st.st_nlink > 1:
            ino = (st.st_dev, st.st_ino)
            if ino in seen:
                continue
            seen.add(ino)
        k = _kind(rel)
        u.bytes[k] += st.st_size
        u.files[k] += 1
    return u


def _tree_bytes(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for _, st in _files(root):
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        total += st.st_size
    return total


def cache_du(session: Session) -> dict[str, Any]:
    """Disk use by kind, with the index's counts (records, layer records, tags, blobs)."""
    u = disk_usage(session.home)
    ops = [_op(r.inputs) for r in session.full_index.list_steps(limit=None, oldest_first=True)]
    layers = ops.count(LAYER_OP)
    return {
        "total": u.total,
        "kinds": {k: {"bytes": u.bytes[k], "files": u.files[k]} for k in KINDS},
        "blobs": sum(1 for _ in session.store.digests()),
        "records": len(ops) - layers,
        "layer_records": layers,
        "tags": len(session.full_index.list_tags()),
        "snapshots": len(_committed_snapshots(session.home)),
        "cache_mounts": len(_cache_mounts(session.home)),
    }


# ---------------------------------------------------------------------------------------
# cache ls
# ---------------------------------------------------------------------------------------
def _op(inputs: str) -> str:
    return str(json.loads(inputs).get("op", "?")) if inputs else "?"


class _Sites:
    """Line and text of a record's instruction, read from its Dockerfile as it is now.

    A record keeps its Dockerfile path, stage and position; the file may have changed since,
    so the instruction found there is used only when it is the same kind (else ``line`` is
    None and the text is the record's op).
    """

    def __init__(self) -> None:
        self.parsed: dict[str, Any] = {}

    def _load(self, path: str) -> Any:
        if path not in self.parsed:
            from builder.frontend import dockerfile as df

            try:
                self.parsed[path] = df.load(Path(path))
            except Exception:  # gone, unreadable or no longer valid: no lines from it
                self.parsed[path] = None
        return self.parsed[path]

    def find(self, rec: StepRecord, op: str) -> tuple[int | None, str]:
        parsed = self._load(rec.dockerfile_id) if rec.dockerfile_id else None
        if parsed is None:
            return None, op
        try:
            instr = parsed.stages[int(rec.stage)].instructions[rec.position]
        except (ValueError, IndexError):
            return None, op
        text = instr.original.split("\n", 1)[0].strip()
        if text.split(None, 1)[0].upper() != op:
            return None, op
        return instr.line, text


def cache_ls(session: Session) -> list[dict[str, Any]]:
    """Every step record, most recently used first (layer records are not steps), with the
    Dockerfile, line and instruction text it was built from."""
    sites = _Sites()
    rows = []
    for r in session.full_index.list_steps(limit=None, oldest_first=False):
        inputs = json.loads(r.inputs) if r.inputs else {}
        op = str(inputs.get("op", "?"))
        if op == LAYER_OP:
            continue
        line, text = sites.find(r, op)
        rows.append(
            {
                "key": r.key,
                "op": op,
                "dockerfile": r.dockerfile_id,
                "stage": r.stage,
                "line": line,
                "instruction": text,
                "diff_id": r.diff_id,
                "size": r.layer_size,
                "hits": r.hits,
                "last_used": r.last_used,
                "created": r.created,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------
# snapshots, cache mounts, tmp
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Dir:
    """A snapshot or cache-mount directory: what it weighs and when it was last used."""

    path: Path
    kind: str  # "snapshot" | "cache-mount" | "tmp"
    label: str
    bytes: int
    last_used: float
    parent: str | None = None  # a snapshot's parent directory name


def _committed_snapshots(home: Path) -> list[_Dir]:
    from urllib.parse import quote

    out: list[_Dir] = []
    root = Home(home).snapshots
    if not root.is_dir():
        return out
    for kind_dir in sorted(root.iterdir()):
        committed = kind_dir / "committed"
        if not committed.is_dir():
            continue
        for d in sorted(committed.iterdir()):
            try:
                parent_name: str | None = (d / "parent").read_text()
            except OSError:
                parent_name = None
            label = f"{kind_dir.name}/{d.name}"
            parent = quote(parent_name, safe="") if parent_name is not None else None
            used = last_used(d / USED, d)
            out.append(_Dir(d, "snapshot", label, _tree_bytes(d), used, parent))
    return out


def _cache_mounts(home: Path) -> list[_Dir]:
    root = Home(home).cache_mounts
    if not root.is_dir():
        return []
    return [
        _Dir(d, "cache-mount", d.name, _tree_bytes(d), last_used(mount_marker(d), d))
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.is_symlink()  # not the <dir>.used markers
    ]


def _tmp_leftovers(home: Path) -> list[_Dir]:
    h = Home(home)
    out: list[_Dir] = []
    areas = [h.tmp]
    if h.snapshots.is_dir():
        for kind_dir in sorted(h.snapshots.iterdir()):
            areas += [kind_dir / "active", kind_dir / "tmp"]
    for area in areas:
        if not area.is_dir():
            continue
        for child in sorted(area.iterdir()):
            size = (
                _tree_bytes(child)
                if child.is_dir() and not child.is_symlink()
                else (child.lstat().st_size)
            )
            rel = child.relative_to(home)
            out.append(_Dir(child, "tmp", str(rel), size, child.lstat().st_mtime))
    return out


def _remove(d: _Dir) -> None:
    if d.kind == "snapshot" or (d.kind == "tmp" and "snapshots" in d.path.parts):
        from cache.layers.apply import remove_tree
        from cache.snapshots.snapshot import cleanup_stale

        if d.kind == "tmp":
            # unmounts what a killed RUN left mounted below it, then removes it
            cleanup_stale(d.path.parent.parent)
            if not d.path.exists():
                return
        remove_tree(d.path)
    elif d.path.is_dir() and not d.path.is_symlink():
        shutil.rmtree(d.path, ignore_errors=True)
        if d.path.exists():  # read-only directories a RUN left: make them writable first
            for dirpath, _dirs, _files in os.walk(d.path):
                with contextlib.suppress(OSError):
                    os.chmod(dirpath, 0o700)
            shutil.rmtree(d.path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            d.path.unlink()
    if d.kind == "cache-mount":
        with contextlib.suppress(FileNotFoundError):
            mount_marker(d.path).unlink()


def _children_first(doomed: list[_Dir], every: list[_Dir]) -> list[_Dir]:
    """Snapshots whose children all go too, deepest first (a parent never goes before its
    children; one with a child that stays is kept)."""
    names = {d.path.parent / d.path.name for d in doomed}
    kept_parents = {
        d.path.parent / d.parent for d in every if d.parent is not None and d.path not in names
    }
    ok = [d for d in doomed if d.path not in kept_parents]
    depth: dict[Path, int] = {}
    by_path = {d.path: d for d in every}

    def level(d: _Dir) -> int:
        if d.path not in depth:
            p = by_path.get(d.path.parent / d.parent) if d.parent else None
            depth[d.path] = 0 if p is None else level(p) + 1
        return depth[d.path]

    return sorted(ok, key=lambda d: -level(d))


# ---------------------------------------------------------------------------------------
# cache prune
# ---------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    lines: list[str]
    freed: int
    notes: list[str]


def cache_prune(
    session: Session, *, keep_bytes: int | None, keep_duration: float | None, dry_run: bool
) -> PruneReport:
    """Garbage-collect the home; returns what goes (or would go), the bytes freed and notes.

    In order: ``tmp`` leftovers (always); snapshots and cache mounts not used within
    ``keep_duration``; then, while the home weighs more than ``keep_bytes``, snapshots least
    recently used first (they are rebuilt from layers on demand); step records unused for
    ``keep_duration`` and, for ``keep_bytes``, least recently used first, with the blobs only
    they need; cache mounts no remaining RUN step names (always); then, for ``keep_bytes``,
    cache mounts least recently used first.  Tagged images are never pruned, and a record
    whose layer a tag holds is kept (removing it would free nothing): when what is left
    still weighs more than ``keep_bytes``, a note says so.
    """
    p = _Pruner(session, keep_bytes, keep_duration, dry_run)
    for d in _tmp_leftovers(session.home):  # nothing runs while prune holds the lock
        p.drop(d, "leftover")
    p.by_age()
    p.snapshots_over_cap()
    p.records_and_blobs()
    p.cache_mounts()
    if not dry_run:  # the layer tars' shape records and the base layers' TOC records
        from cache.layers.retar import sweep  # whose tar or TOC blob went with a record

        home = Home(session.home)
        for records in (home.tar_shapes, home.layer_tocs):
            sweep(records, session.store.has)
    return p.report


class _Pruner:
    """One prune's state: what is left of the home (index and memos aside) and the report."""

    def __init__(
        self, session: Session, keep_bytes: int | None, keep_duration: float | None, dry: bool
    ) -> None:
        self.session, self.keep_bytes, self.keep_duration, self.dry = (
            session,
            keep_bytes,
            keep_duration,
            dry,
        )
        self.now = time.time()
        u = disk_usage(session.home)
        self.total = u.total - u.bytes["db"] - u.bytes["memo"] - u.bytes["other"]
        self.report = PruneReport([], 0, [])
        self.snaps = _committed_snapshots(session.home)
        self.mounts = _cache_mounts(session.home)
        self.records = session.full_index.list_steps(limit=None, oldest_first=True)
        self.gone: set[str] = set()  # step keys that go
        self.sizes: dict[Digest, int] = {}
        self.pinned: set[Digest] = set()

    def left(self) -> int:
        return self.total - self.report.freed

    def drop(self, d: _Dir, reason: str) -> None:
        self.report.lines.append(f"{d.kind} {d.label} {human(d.bytes)} ({reason})")
        self.report.freed += d.bytes
        if not self.dry:
            _remove(d)
        for group in (self.snaps, self.mounts):
            if d in group:
                group.remove(d)

    def by_age(self) -> None:
        if self.keep_duration is None:
            return
        cutoff = self.now - self.keep_duration
        for d in _children_first([s for s in self.snaps if s.last_used < cutoff], self.snaps):
            self.drop(d, "age")
        for d in [m for m in self.mounts if m.last_used < cutoff]:
            self.drop(d, "age")

    def snapshots_over_cap(self) -> None:
        if self.keep_bytes is None or self.left() <= self.keep_bytes:
            return
        chosen: list[_Dir] = []
        over = self.left() - self.keep_bytes
        for d in sorted(self.snaps, key=lambda s: s.last_used):
            if over <= 0:
                break
            chosen.append(d)
            over -= d.bytes
        for d in _children_first(chosen, self.snaps):
            self.drop(d, "size")

    def records_and_blobs(self) -> None:
        from dataclasses import replace

        index, store = self.session.full_index, self.session.store
        self.sizes = sizes = {d: store.size(d) for d in store.digests()}
        self.pinned = {d for t in index.list_tags() for d in (*t.blobs, t.manifest_digest)}
        budget = None
        if self.keep_bytes is not None:
            budget = max(self.keep_bytes - (self.left() - sum(sizes.values())), 0)
        plan = index.prune_plan(
            keep_bytes=budget, keep_duration_s=self.keep_duration, now=self.now, blob_sizes=sizes
        )
        by_key = {r.key: r for r in self.records}
        kept_back = {
            s.key for s in plan.steps if s.reason == "size" and by_key[s.key].diff_id in self.pinned
        }
        steps = tuple(s for s in plan.steps if s.key not in kept_back)
        keep_blobs = {d for k in kept_back for d in by_key[k].blobs}
        doomed = tuple(d for d in plan.blobs if d not in keep_blobs)
        layer_keys = {r.key for r in self.records if _op(r.inputs) == LAYER_OP}
        self.report.lines += [
            f"{'layer' if s.key in layer_keys else 'step'} {s.key[:16]} ({s.reason})" for s in steps
        ]
        self.report.lines += [f"blob {d} {human(sizes.get(d, 0))}" for d in doomed]
        self.gone = {s.key for s in steps}
        if self.dry:
            self.report.freed += sum(sizes.get(d, 0) for d in doomed)
            return
        for digest in index.apply_prune(replace(plan, steps=steps, blobs=doomed)):
            self.report.freed += sizes.get(digest, 0)
            store.remove(digest)

    def cache_mounts(self) -> None:
        named = _named_cache_mounts(r for r in self.records if r.key not in self.gone)
        for d in [m for m in self.mounts if m.path.name not in named]:
            self.drop(d, "unused")
        if self.keep_bytes is None:
            return
        for d in sorted(self.mounts, key=lambda m: m.last_used):
            if self.left() <= self.keep_bytes:
                break
            self.drop(d, "size")
        if self.left() > self.keep_bytes:
            tagged = sum(self.sizes.get(d, 0) for d in self.pinned)
            self.report.notes.append(
                f"--keep-bytes {self.keep_bytes} cannot be reached: {human(self.left())} is "
                f"left, of which tagged images hold {human(tagged)} (`lbuild rmi NAME` "
                "releases one; `lbuild images` lists them)"
            )


def _named_cache_mounts(records: Iterable[StepRecord]) -> set[str]:
    """The cache-mount directory names the RUN steps of these records use."""
    import uuid

    from builder.frontend.runmount import parse_mount

    out: set[str] = set()
    for r in records:
        inputs = json.loads(r.inputs) if r.inputs else {}
        if inputs.get("op") != "RUN":
            continue
        instr = inputs.get("instruction") or {}
        for raw in instr.get("mounts") or ():
            try:
                m = parse_mount(raw, "", 0)
            except InvalidInput:
                continue
            if m.type == "cache":
                target = m.target
                if target and not target.startswith("/"):  # as the RUN step resolves it
                    target = posixpath.join(str(inputs.get("workdir") or "/"), target)
                out.add(uuid.uuid5(uuid.NAMESPACE_URL, m.id or target).hex)
    return out


# ---------------------------------------------------------------------------------------
# images, tag, rmi
# ---------------------------------------------------------------------------------------
def validate_tag(name: str) -> str:
    """``NAME[:TAG]`` as Docker validates it (``foo::bar`` and upper case are refused);
    returns lbuild's stored form ``name:tag``."""
    from builder.options import full_tag
    from cache.registry.reference import parse

    ref = parse(name)
    if ref.digest is not None:
        raise InvalidInput(f"invalid tag {name!r}: a tag cannot name a digest")
    return full_tag(name)


def _image_row(session: Session, t: TagRecord) -> dict[str, Any]:
    from cache.types import Digest as D

    size = 0
    created = ""
    try:
        manifest = json.loads(session.store.read(t.manifest_digest))
        size = int(manifest["config"]["size"]) + sum(int(x["size"]) for x in manifest["layers"])
        config = json.loads(session.store.read(D(manifest["config"]["digest"])))
        created = str(config.get("created", ""))
    except (OSError, KeyError, ValueError):
        pass
    repo, _, tag = t.name.rpartition(":")
    return {
        "name": t.name,
        "repository": repo,
        "tag": tag,
        "digest": t.manifest_digest,
        "size": size,
        "created": created,
        "tagged": t.updated,
    }


def images(session: Session) -> list[dict[str, Any]]:
    """The tags of the local store, by name."""
    return [_image_row(session, t) for t in session.full_index.list_tags()]


def _find_tag(session: Session, name: str) -> TagRecord:
    from builder.options import full_tag

    t = session.full_index.get_tag(full_tag(name))
    if t is None:
        raise NotFound(f"No such image: {full_tag(name)}")
    return t


def tag(session: Session, src: str, dst: str) -> str:
    """Point ``dst`` at the image ``src`` names; returns the stored name."""
    target = validate_tag(dst)
    found = _find_tag(session, src)
    session.full_index.set_tag(target, found.manifest_digest, found.meta_json, blobs=found.blobs)
    return target


def rmi(session: Session, name: str) -> str:
    """Remove a tag (its blobs go at the next ``cache prune``); returns the stored name."""
    found = _find_tag(session, name)
    session.full_index.delete_tag(found.name)
    return found.name


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
