"""The semantic comparison of two images, level by level (diffoci's levels).

1. index: the image index each manifest was picked from (when both came through one);
2. manifest: every field but the layer list (media type, config descriptor, annotations, ...);
3. config: field by field (``created``, ``config.Env[2]``, ``history[3].created_by``, ...),
   except ``rootfs.diff_ids``, which the layer level reports;
4. layers, pairwise by position: diff_id, blob digest, size, media type;
5. tar entries of every layer pair whose diff_ids differ: files added, removed, and changed
   (content, size, mode, uid/gid, uname/gname, mtime, link target, xattrs, typeflag, device
   numbers, other PAX records), and the entry order.

Digests that only follow from a difference elsewhere (the config blob's digest, a layer's
blob digest, size and diff_id) are *derived*.  Without ignore options they count like
everything else; with ``--ignore-timestamps`` or ``--ignore-history`` they are shown but do
not make two images different (two layers whose only difference is an ignored mtime have
different diff_ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from builder.compare.source import Image, Layer, Member, iter_members

__all__ = ["DiffOptions", "DiffResult", "FieldDiff", "FileDiff", "LayerDiff", "diff_images"]

_ABSENT: Any = object()


@dataclass(frozen=True)
class DiffOptions:
    ignore_timestamps: bool = False
    ignore_history: bool = False

    @property
    def any(self) -> bool:
        return self.ignore_timestamps or self.ignore_history


@dataclass(frozen=True)
class FieldDiff:
    """One JSON field that differs: ``field`` is a path such as ``config.Env[1]``; a side that
    lacks the field has ``ABSENT`` (``a_present``/``b_present`` False)."""

    field: str
    a: Any
    b: Any
    a_present: bool = True
    b_present: bool = True
    derived: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field}
        if self.a_present:
            out["a"] = self.a
        if self.b_present:
            out["b"] = self.b
        if self.derived:
            out["derived"] = True
        return out


@dataclass(frozen=True)
class FileDiff:
    """A path that differs inside a layer pair: ``added``, ``removed`` or ``changed`` (with
    each differing attribute as (value in A, value in B))."""

    path: str
    status: str
    changes: tuple[tuple[str, Any, Any], ...] = ()
    type: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "status": self.status}
        if self.type:
            out["type"] = self.type
        if self.changes:
            out["changes"] = {k: [a, b] for k, a, b in self.changes}
        return out


@dataclass
class LayerDiff:
    """Layer ``index`` of both images (either may be missing when the counts differ)."""

    index: int
    a: Layer | None
    b: Layer | None
    fields: list[FieldDiff] = field(default_factory=list)
    files: list[FileDiff] = field(default_factory=list)
    order: dict[str, Any] | None = None  # the first place the common entries' order differs
    compared_files: bool = False
    strict: bool = True  # derived fields count (no ignore option given)

    @property
    def counts(self) -> bool:
        """Whether this layer pair makes the images different."""
        return bool(
            self.a is None
            or self.b is None
            or self.files
            or self.order
            or any(self.strict or not f.derived for f in self.fields)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "a": _layer_json(self.a),
            "b": _layer_json(self.b),
            "fields": [f.to_json() for f in self.fields],
            "files": [f.to_json() for f in self.files],
            "order": self.order,
        }


def _layer_json(layer: Layer | None) -> dict[str, Any] | None:
    if layer is None:
        return None
    return {
        "diff_id": layer.diff_id,
        "digest": layer.digest or None,
        "size": layer.size,
        "mediaType": layer.media_type,
    }


@dataclass
class DiffResult:
    a: Image
    b: Image
    options: DiffOptions
    index: list[FieldDiff] = field(default_factory=list)
    manifest: list[FieldDiff] = field(default_factory=list)
    config: list[FieldDiff] = field(default_factory=list)
    layers: list[LayerDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        rows = [*self.index, *self.manifest, *self.config]
        strict = not self.options.any
        return not any(strict or not r.derived for r in rows) and not any(
            ld.counts for ld in self.layers
        )

    @property
    def first_layer(self) -> int | None:
        """The first layer position that differs (None when every layer pair is equal)."""
        for ld in self.layers:
            if ld.counts:
                return ld.index
        return None

    def to_json(self) -> dict[str, Any]:
        def side(img: Image) -> dict[str, Any]:
            return {
                "ref": img.ref,
                "kind": img.kind,
                "manifest": img.manifest_digest,
                "config": img.config_digest,
                "layers": len(img.layers),
            }

        return {
            "equal": self.equal,
            "a": side(self.a),
            "b": side(self.b),
            "options": {
                "ignore_timestamps": self.options.ignore_timestamps,
                "ignore_history": self.options.ignore_history,
            },
            "index": [f.to_json() for f in self.index],
            "manifest": [f.to_json() for f in self.manifest],
            "config": [f.to_json() for f in self.config],
            "layers": [ld.to_json() for ld in self.layers if ld.fields or ld.counts],
        }


# ---------------------------------------------------------------------------------------------
# JSON field diffs


def json_diff(a: Any, b: Any, path: str = "") -> Iterator[FieldDiff]:
    """Every leaf where ``a`` and ``b`` differ (objects by key, lists by position)."""
    if a is _ABSENT or b is _ABSENT:
        yield FieldDiff(
            path or ".",
            None if a is _ABSENT else a,
            None if b is _ABSENT else b,
            a_present=a is not _ABSENT,
            b_present=b is not _ABSENT,
        )
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            sub = f"{path}.{k}" if path else str(k)
            yield from json_diff(a.get(k, _ABSENT), b.get(k, _ABSENT), sub)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            yield from json_diff(
                a[i] if i < len(a) else _ABSENT, b[i] if i < len(b) else _ABSENT, f"{path}[{i}]"
            )
        return
    if a != b or type(a) is not type(b):
        yield FieldDiff(path or ".", a, b)


def _ignored_config_field(name: str, opts: DiffOptions) -> bool:
    if opts.ignore_history and (name == "history" or name.startswith(("history[", "history."))):
        return True
    if opts.ignore_timestamps:
        if name == "created":
            return True
        if name.startswith("history[") and name.endswith("].created"):
            return True
    return name == "rootfs.diff_ids" or name.startswith("rootfs.diff_ids[")


def _config_diff(a: Image, b: Image, opts: DiffOptions) -> list[FieldDiff]:
    return [f for f in json_diff(a.config, b.config) if not _ignored_config_field(f.field, opts)]


def _manifest_diff(a: Image, b: Image, opts: DiffOptions) -> list[FieldDiff]:
    if a.manifest is None or b.manifest is None:
        return []  # a docker archive has no manifest: its config is compared directly
    ma = {k: v for k, v in a.manifest.items() if k != "layers"}
    mb = {k: v for k, v in b.manifest.items() if k != "layers"}
    out = []
    for f in json_diff(ma, mb):
        derived = f.field in ("config.digest", "config.size")
        out.append(FieldDiff(f.field, f.a, f.b, f.a_present, f.b_present, derived))
    return out


def _index_diff(a: Image, b: Image) -> list[FieldDiff]:
    if a.index is None or b.index is None:
        return []
    return [
        FieldDiff(f.field, f.a, f.b, f.a_present, f.b_present, derived=".digest" in f.field)
        for f in json_diff(a.index, b.index)
    ]


# ---------------------------------------------------------------------------------------------
# Layers and files


def _layer_fields(a: Layer, b: Layer, both_manifests: bool) -> list[FieldDiff]:
    out = []
    if a.diff_id != b.diff_id:
        out.append(FieldDiff("diff_id", a.diff_id, b.diff_id, derived=True))
    if both_manifests:
        if a.digest != b.digest:
            out.append(FieldDiff("digest", a.digest, b.digest, derived=True))
        if a.size != b.size:
            out.append(FieldDiff("size", a.size, b.size, derived=True))
        if a.media_type != b.media_type:
            out.append(FieldDiff("mediaType", a.media_type, b.media_type))
    return out


def _members(layer: Layer, what: str) -> tuple[dict[str, Member], list[str]]:
    """path -> member (the last one wins, as when applied) and the paths in tar order."""
    by_path: dict[str, Member] = {}
    order: list[str] = []
    for m in iter_members(layer, what):
        if m.path not in by_path:
            order.append(m.path)
        by_path[m.path] = m
    return by_path, order


_TYPE_NAMES = {
    "0": "file",
    "\0": "file",
    "7": "file",
    "1": "hardlink",
    "2": "symlink",
    "3": "char",
    "4": "block",
    "5": "dir",
    "6": "fifo",
}


def type_name(typeflag: str) -> str:
    return _TYPE_NAMES.get(typeflag, f"typeflag {typeflag!r}")


def _mtime(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def member_changes(a: Member, b: Member, opts: DiffOptions) -> list[tuple[str, Any, Any]]:
    """The attributes that differ between two members of the same path."""
    out: list[tuple[str, Any, Any]] = []
    if a.typeflag != b.typeflag:
        out.append(("typeflag", a.typeflag, b.typeflag))
    if a.digest != b.digest:
        out.append(("content", a.digest[:16], b.digest[:16]))
    if a.size != b.size:
        out.append(("size", a.size, b.size))
    if a.mode != b.mode:
        out.append(("mode", f"{a.mode:04o}", f"{b.mode:04o}"))
    if a.uid != b.uid:
        out.append(("uid", a.uid, b.uid))
    if a.gid != b.gid:
        out.append(("gid", a.gid, b.gid))
    if a.uname != b.uname:
        out.append(("uname", a.uname, b.uname))
    if a.gname != b.gname:
        out.append(("gname", a.gname, b.gname))
    if a.mtime != b.mtime and not opts.ignore_timestamps:
        out.append(("mtime", _mtime(a.mtime), _mtime(b.mtime)))
    if a.link != b.link:
        out.append(("link", a.link, b.link))
    if (a.devmajor, a.devminor) != (b.devmajor, b.devminor):
        out.append(("device", f"{a.devmajor},{a.devminor}", f"{b.devmajor},{b.devminor}"))
    if a.xattrs != b.xattrs:
        out.append(("xattrs", dict(a.xattrs), dict(b.xattrs)))
    pa, pb = a.pax, b.pax
    if opts.ignore_timestamps:
        pa = tuple(kv for kv in pa if kv[0] not in _TIME_PAX)
        pb = tuple(kv for kv in pb if kv[0] not in _TIME_PAX)
    if pa != pb:
        out.append(("pax", dict(pa), dict(pb)))
    return out


_TIME_PAX = frozenset({"atime", "ctime", "mtime", "LIBARCHIVE.creationtime"})


def compare_members(
    a: tuple[dict[str, Member], list[str]],
    b: tuple[dict[str, Member], list[str]],
    opts: DiffOptions,
) -> tuple[list[FileDiff], dict[str, Any] | None]:
    """File differences of two layers' members and the first entry-order difference."""
    ma, order_a = a
    mb, order_b = b
    files: list[FileDiff] = []
    for path in sorted(set(ma) | set(mb)):
        x, y = ma.get(path), mb.get(path)
        if x is None:
            assert y is not None
            files.append(FileDiff(path, "added", type=type_name(y.typeflag)))
        elif y is None:
            files.append(FileDiff(path, "removed", type=type_name(x.typeflag)))
        else:
            changes = member_changes(x, y, opts)
            if changes:
                files.append(FileDiff(path, "changed", tuple(changes), type_name(x.typeflag)))
    common_a = [p for p in order_a if p in mb]
    common_b = [p for p in order_b if p in ma]
    order = None
    if common_a != common_b:
        i = next(i for i, (p, q) in enumerate(zip(common_a, common_b, strict=True)) if p != q)
        order = {
            "first": common_a[i],
            "a_position": ma[common_a[i]].order,
            "b_position": mb[common_a[i]].order,
            "b_has_there": common_b[i],
        }
    return files, order


def _pairs(a: Image, b: Image) -> Iterable[tuple[int, Layer | None, Layer | None]]:
    for i in range(max(len(a.layers), len(b.layers))):
        yield (
            i,
            a.layers[i] if i < len(a.layers) else None,
            b.layers[i] if i < len(b.layers) else None,
        )


def diff_images(a: Image, b: Image, opts: DiffOptions | None = None) -> DiffResult:
    """Compare two images at every level (see the module docstring)."""
    opts = opts or DiffOptions()
    res = DiffResult(a, b, opts)
    if a.manifest_digest is not None and a.manifest_digest == b.manifest_digest:
        return res  # the same manifest bytes: the same image
    res.index = _index_diff(a, b)
    res.manifest = _manifest_diff(a, b, opts)
    res.config = _config_diff(a, b, opts)
    both_manifests = a.manifest is not None and b.manifest is not None
    todo: list[LayerDiff] = []
    for i, la, lb in _pairs(a, b):
        ld = LayerDiff(i, la, lb, strict=not opts.any)
        if la is not None and lb is not None:
            ld.fields = _layer_fields(la, lb, both_manifests)
            if la.diff_id != lb.diff_id or not la.diff_id:
                todo.append(ld)
        res.layers.append(ld)
    if todo:
        _compare_files(todo, opts)
    for ld in res.layers:
        if ld.compared_files and not ld.files and not ld.order and not opts.any:
            # the tars differ only in how they are written (headers, padding, end marker)
            ld.fields.append(FieldDiff("tar bytes", "entries equal", "encoded differently"))
    return res


def _compare_files(todo: list[LayerDiff], opts: DiffOptions) -> None:
    """Stream both sides of each layer pair (the two sides on two threads)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        for ld in todo:
            assert ld.a is not None and ld.b is not None
            fa = pool.submit(_members, ld.a, f"A layer {ld.index}")
            fb = pool.submit(_members, ld.b, f"B layer {ld.index}")
            ld.files, ld.order = compare_members(fa.result(), fb.result(), opts)
            ld.compared_files = True
