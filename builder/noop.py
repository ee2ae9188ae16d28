"""The no-op rebuild path: answer "nothing changed" without SQLAlchemy or a plan.

A successful build leaves a *memo* (``$LBUILD_HOME/memo/<key>.json``) keyed by everything
that decides the image apart from the context's files: the Dockerfile's bytes, the ignore
file's bytes, build args, target, build contexts (their index.json bytes), compression,
mtime options and lbuild's layer format.  The memo holds a fingerprint of the context (the
stat tuple of every file the ignore rules let through), the local tags the build resolved,
and the image it produced.  The next build with the same memo key re-walks the context
(one lstat per file), and when the fingerprint, the tags and the blobs all still match it
exports the same image again without planning anything.

This is safe in the same way the stat index is: a file whose (size, mtime_ns, ctime_ns,
inode, mode) did not change is taken as unchanged, and a memo is not written when any file
changed within ``RACY_NS`` of the build starting (the timestamp could not tell a later
same-size edit apart).  Any doubt falls back to the normal path, which is always correct.
"""

from __future__ import annotations

import json
import os
import stat as st_mod
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.plan.listing import Scans, list_dir

if TYPE_CHECKING:
    from builder.options import BuildOptions, BuildResult
    from builder.progress import Reporter

RACY_NS = 2_000_000_000
TOUCH_EVERY_S = 3600.0
MEMO_FORMAT = 1


@dataclass(frozen=True)
class Fingerprint:
    """blake3 of the context's stat tuples, and whether any file was too fresh to trust."""

    digest: str
    racy: bool


def _b3(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


def fingerprint(
    root: Path, ignore_rules: Any, now_ns: int, scans: Scans | None = None
) -> Fingerprint:
    """Walk the context like the builder does (ignore rules applied) and hash the stat tuples.

    The listings it takes are stored in ``scans`` when given.
    """
    import blake3

    h = blake3.blake3()
    racy = False
    limit = now_ns - RACY_NS
    rules = ignore_rules
    plain = not rules.patterns
    top = str(root)
    empty: tuple[bool, ...] = (False,) * len(rules.patterns)
    stack: list[tuple[str, tuple[bool, ...]]] = [("", empty)]
    lines: list[str] = []
    while stack:
        rel_dir, dstate = stack.pop()
        path = os.path.join(top, rel_dir) if rel_dir else top
        try:
            listing = list_dir(path)
        except OSError:
            lines.append(f"!{rel_dir}")
            continue
        if scans is not None:
            scans[rel_dir or "."] = listing
        subdirs = []
        for name, s in listing:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = os.path.join(path, name)
            is_dir = st_mod.S_ISDIR(s.st_mode)
            state = empty if plain else rules.child_state(dstate, rel)
            excluded = False if plain else rules.excluded_by(state)
            if excluded and not (is_dir and rules.may_include_below_from(rel, state)):
                continue
            if s.st_ctime_ns > limit or s.st_mtime_ns > limit:
                racy = True
            link = os.readlink(full) if st_mod.S_ISLNK(s.st_mode) else ""
            lines.append(
                f"{rel}\0{s.st_mode}\0{s.st_size}\0{s.st_mtime_ns}\0{s.st_ctime_ns}\0"
                f"{s.st_ino}\0{s.st_nlink}\0{int(excluded)}\0{link}"
            )
            if is_dir:
                subdirs.append((rel, state))
        stack.extend(reversed(subdirs))
    h.update("\n".join(lines).encode("utf-8", "surrogateescape"))  # non-UTF-8 names
    return Fingerprint(h.hexdigest(), racy)


def memo_key(opts: BuildOptions, epoch: int) -> tuple[str, Path, Any] | None:
    """(key, ignore-rules) for a build, or None when the fast path must not be tried."""
    from builder.frontend.dockerignore import load_ignore
    from builder.frontend.names import identity
    from builder.options import oci_layout_ref, run_clamp
    from builder.plan.keys import KEY_FORMAT

    if opts.no_cache or opts.no_cache_filter:
        return None
    ctx = opts.context.resolve()
    dfile = (opts.dockerfile or opts.context / "Dockerfile").resolve()
    data = _read(dfile)
    if data is None or not ctx.is_dir():
        return None
    rules, ignore_path = load_ignore(ctx, dfile)
    contexts: dict[str, str] = {}
    for name, spec in sorted(opts.build_contexts.items()):
        layout = oci_layout_ref(spec)
        if layout is None:
            return None
        index = _read(Path(layout[0]) / "index.json")
        if index is None:
            return None
        contexts[name] = f"{spec}\0{_b3(index)}"
    ident = {
        "memo": MEMO_FORMAT,
        "layer_format": KEY_FORMAT,
        "dockerfile": identity(opts.dockerfile, opts.context),  # -f -: CONTEXT/-
        "dockerfile_b3": _b3(data),
        "context": str(ctx),
        "ignore": str(ignore_path) if ignore_path else None,
        "ignore_b3": _b3(_read(ignore_path) or b"") if ignore_path else None,
        "args": sorted(opts.build_args.items()),
        "contexts": contexts,
        "target": opts.target,
        "compression": opts.compression,
        "keep_mtime": opts.keep_mtime,
        "epoch": epoch,
        "clamp": run_clamp(opts),
        "snapshotter": opts.snapshotter,
        "labels": sorted(opts.labels.items()),  # --label and --annotation change the image
        "annotations": sorted(opts.annotations.items()),
        "allow": list(opts.allow),  # a memo made with --allow must not answer a build without
    }
    return _b3(json.dumps(ident, sort_keys=True).encode()), ctx, rules


def memo_path(home: Path, key: str) -> Path:
    from cache.home import Home

    return Home(home).memo / f"{key}.json"


def save_memo(
    home: Path,
    key: str,
    fp: Fingerprint,
    result: BuildResult,
    steps: list[dict[str, str]],
    tags_used: dict[str, str],
    blobs: list[str],
    dag: dict[str, Any] | None = None,
) -> None:
    """Write the memo atomically.

    A racy fingerprint is not stored (None never matches), so such a memo never answers a
    no-op; the rest of it still does its job: ``dag`` (the plan's DAG with its topological
    order, which depends on the memo key's inputs only) lets the next build with the same
    key skip ordering it (``Plan.topo_ids``).
    """
    body = {
        "fingerprint": None if fp.racy else fp.digest,
        "dag": dag,
        "manifest": result.manifest_digest,
        "config": result.config_digest,
        "steps": steps,
        "tags_used": tags_used,
        "blobs": blobs,
        "touched": time.time(),
    }
    path = memo_path(home, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(body, sort_keys=True))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Probe:
    """What the fast path learnt before giving up: reused by the normal build."""

    key: str
    fingerprint: Fingerprint
    scans: Scans
    dag: dict[str, Any] | None = None
    """The step DAG and its topological order from the memo (``Plan.topo_ids``)."""


def probe(opts: BuildOptions, epoch: int) -> Probe | None:
    """Memo key and context fingerprint of a build (None when no memo may be used)."""
    mk = memo_key(opts, epoch)
    if mk is None:
        return None
    key, ctx, rules = mk
    scans: Scans = {}
    return Probe(key, fingerprint(ctx, rules, time.time_ns(), scans), scans)


def try_fast(opts: BuildOptions, reporter: Reporter) -> tuple[BuildResult | None, Probe | None]:
    """The build's result if nothing changed since the memo was written (else None), and the
    probe the normal build can reuse.  A build that exports its cache (``--cache-to``) never
    takes the fast path: the export is its point."""
    from builder.options import source_date_epoch
    from cache.home import Home, home_dir

    if opts.cache_to:
        return None, None
    t0 = time.monotonic()
    home = home_dir(opts.home)
    pr = probe(opts, source_date_epoch(opts.epoch))
    db = Home(home).db
    if pr is None or not db.exists():
        return None, pr
    raw = _read(memo_path(home, pr.key))
    if raw is None:
        return None, pr
    try:
        memo = json.loads(raw)
    except ValueError:
        return None, pr
    if not isinstance(memo, dict):
        return None, pr
    dag = memo.get("dag")
    if isinstance(dag, dict):  # the plan's DAG does not depend on the context's files
        pr = replace(pr, dag=dag)
    if pr.fingerprint.digest != memo.get("fingerprint"):
        return None, pr
    try:
        return _replay(opts, reporter, home, memo, t0), pr
    except Exception:  # anything inconsistent (memo, index, a blob): the normal path decides
        return None, pr


def _replay(
    opts: BuildOptions, reporter: Reporter, home: Path, memo: dict[str, Any], t0: float
) -> BuildResult | None:
    from builder.options import BuildResult
    from cache.home import Home

    db = Home(home).db
    blobs_dir = Home(home).blobs
    for d in memo["blobs"]:
        if not (blobs_dir / d.split(":", 1)[1]).is_file():
            return None
    wanted_tags = {_full(t) for t in opts.tags}
    if memo["tags_used"] or wanted_tags:
        from cache.index.reader import FastIndex

        fast = FastIndex.open(str(db))
        if fast is None:
            return None
        try:
            for name, digest in memo["tags_used"].items():
                rec = fast.get_tag(name)
                if rec is None or rec.manifest_digest != digest:
                    return None
            for name in wanted_tags:  # a tag to (re)point needs the normal path's writer
                rec = fast.get_tag(name)
                if rec is None or rec.manifest_digest != memo["manifest"]:
                    return None
        finally:
            fast.close()
    if time.time() - float(memo.get("touched", 0)) > TOUCH_EVERY_S:
        return None  # let the normal path bump last-used times now and then
    from cache.home import lock_home

    with lock_home(home, exclusive=False):
        for d in memo["blobs"]:  # a prune may have run since the first check
            if not (blobs_dir / d.split(":", 1)[1]).is_file():
                return None
        _export(opts, home, memo)
    result = BuildResult(
        memo["manifest"],
        memo["config"],
        len(memo["steps"]),
        len(memo["steps"]),
        time.monotonic() - t0,
    )
    for s in memo["steps"]:
        reporter.step_done(_Shown(s["id"], s["name"], s["key"]), cached=True, seconds=0.0)  # type: ignore[arg-type]
    reporter.finish(result)
    return result


@dataclass(frozen=True)
class _Shown:
    """Just enough of a plan Step for the progress reporters."""

    id: str
    name: str
    key: str
    kind: str = "memo"


def _full(tag: str) -> str:
    from builder.options import full_tag

    return full_tag(tag)


def _export(opts: BuildOptions, home: Path, memo: dict[str, Any]) -> None:
    from builder.options import full_tag, split_tag

    todo = []
    for out in opts.outputs:
        if out.type == "oci" and not out.tar:  # a tarball is always written again
            tag = split_tag(opts.tags[0])[1] if opts.tags else "latest"
            if not _layout_has(out.dest, memo["manifest"], tag):
                todo.append(out)
        else:
            todo.append(out)
    if not todo:
        return
    from builder.export.oci import export_docker_archive, export_oci_archive, export_oci_layout
    from cache.store.blobs import BlobStore

    store = BlobStore(home)
    image = stored_image(store, memo["manifest"])
    for out in todo:
        if out.type == "oci":
            tag = split_tag(opts.tags[0])[1] if opts.tags else "latest"
            export = export_oci_archive if out.tar else export_oci_layout
            export(store, image, out.dest, tag)
        else:
            export_docker_archive(store, image, out.dest, [full_tag(t) for t in opts.tags])


def stored_image(store: Any, manifest_digest: str) -> Any:
    """The export.Image for a manifest whose blobs are all in the content store."""
    from builder.export.oci import Image
    from cache.types import BlobInfo, Digest

    manifest = _verified(store, Digest(manifest_digest))
    m = json.loads(manifest)
    config = _verified(store, Digest(m["config"]["digest"]))
    layers = tuple(
        BlobInfo(Digest(x["digest"]), int(x["size"]), x["mediaType"]) for x in m["layers"]
    )
    diff_ids = tuple(Digest(d) for d in json.loads(config)["rootfs"]["diff_ids"])
    return Image(
        Digest(manifest_digest), manifest, Digest(m["config"]["digest"]), config, layers, diff_ids
    )


def _verified(store: Any, d: Any) -> bytes:
    """A small blob's bytes, checked against its name (``CorruptBlob``, blob removed)."""
    import hashlib

    from cache.types import sha256_digest

    data: bytes = store.read(d)
    store.vouch(d, sha256_digest(hashlib.sha256(data).hexdigest()))
    return data


def _layout_has(dest: Path, manifest: str, tag: str) -> bool:
    raw = _read(dest / "index.json")
    if raw is None:
        return False
    try:
        index = json.loads(raw)
    except ValueError:
        return False
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = str(m.get("digest", ""))
            return (
                digest == manifest
                and (dest / "blobs" / "sha256" / manifest.split(":")[1]).is_file()
            )
    return False
