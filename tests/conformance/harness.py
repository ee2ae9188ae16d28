"""Differential conformance harness: build one Dockerfile with lbuild and with buildah, compare.

Pieces (used by conftest.py and test_conformance.py):

- ``make_base_layout``: the shared base image, written by hand (Python tarfile + umoci), not by
  lbuild, so a defect of lbuild's cannot hide in the base both builders start from. Layer 1 is
  busybox (applets as absolute symlinks), /etc/passwd and /etc/group, and directories with
  every kind of metadata (1777 /tmp, 0700 /root, 0750 app:app /home/app, setgid /srv, ...).
  Layer 2 adds files under some of those directories *without* their parent entries (as images
  from elsewhere do), so a builder must take the parents' metadata from layer 1.
- ``Buildah``: a private containers-storage (storage.conf under a temp dir) holding the base as
  ``localhost/base:latest``; builds with ``buildah bud --isolation chroot --pull=never --format oci
  --layers --timestamp 0`` and ``buildah push ... oci:DIR:latest``.
- ``build_lbuild``: the ``lbuild`` command line with ``--build-context base=oci-layout://BASE``,
  ``--output type=oci,dest=DIR`` and ``SOURCE_DATE_EPOCH=0`` (buildah's ``--timestamp 0``: files
  written by RUN get mtime 0 on both sides).
- ``read_image``: the merged file tree of an OCI layout, computed by applying its layer tars in
  Python (whiteouts, opaque directories, hardlinks, missing parents), plus its config.
- ``compare``: every path's type, mode (with setuid/setgid/sticky), uid, gid, size, content
  digest, link target, device numbers, xattrs, hardlink group; mtimes where both builders
  define them the same way (see ``_mtime_comparable``); and the config fields.
"""

from __future__ import annotations

import bz2
import copy
import dataclasses
import difflib
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import busybox  # type: ignore[import-not-found]  # noqa: E402  (tests/busybox.py)

BASE_MTIME = 1600000000
BASE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
# buildah's RUN layers carry these (mount points and files it bind-mounts into the container):
# they are not part of what the Dockerfile asked for; PEERS.md says leave them out.
BUILDAH_RUN_NOISE = ("etc/hostname", "etc/hosts", "etc/resolv.conf", "run", "dev", "proc", "sys")


class BuildFailed(AssertionError):
    """lbuild failed: a finding about lbuild (an xfail case may expect it)."""


class PeerFailed(RuntimeError):
    """buildah, skopeo or umoci failed: a problem of the harness or of a case, never an
    expected failure (xfail marks name AssertionError only, so this one is always reported)."""


def run(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
        cwd: Path | None = None, check: bool = True,
        error: type[Exception] = PeerFailed) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=300)
    if check and p.returncode != 0:
        raise error(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-3000:]}\n"
                    f"{p.stderr[-3000:]}")
    return p


# ---------------------------------------------------------------------------------------------
# The base image


def _tarinfo(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0,
             linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""
    ti.mtime = BASE_MTIME
    ti.linkname = linkname
    ti.size = size
    return ti


def _base_layers(explicit_parents: bool) -> list[list[tuple[tarfile.TarInfo, bytes | None]]]:
    D, F, L = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    passwd = (b"root:x:0:0:root:/root:/bin/sh\n"
              b"app:x:1000:1000:app:/home/app:/bin/sh\n"
              b"svc:x:1001:1002:svc:/srv:/bin/sh\n"
              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    group = b"root:x:0:\napp:x:1000:\nstaff:x:50:\nsvcgrp:x:1002:\nnogroup:x:65534:\n"
    bb = busybox.BUSYBOX.read_bytes()
    l1: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(ti: tarfile.TarInfo, data: bytes | None = None) -> None:
        if data is not None:
            ti.size = len(data)
        l1.append((ti, data))

    add(_tarinfo("bin", D, 0o755))
    add(_tarinfo("bin/busybox", F, 0o755), bb)
    for name in sorted(busybox.applets()):
        if name != "busybox":
            add(_tarinfo(f"bin/{name}", L, 0o777, linkname="/bin/busybox"))
    add(_tarinfo("etc", D, 0o755))
    add(_tarinfo("etc/passwd", F, 0o644), passwd)
    add(_tarinfo("etc/group", F, 0o644), group)
    add(_tarinfo("etc/motd", F, 0o644), b"welcome\n")
    add(_tarinfo("tmp", D, 0o1777))
    add(_tarinfo("root", D, 0o700))
    add(_tarinfo("home", D, 0o755))
    add(_tarinfo("home/app", D, 0o750, 1000, 1000))
    add(_tarinfo("home/app/.profile", F, 0o640, 1000, 1000), b"export A=1\n")
    add(_tarinfo("srv", D, 0o2775, 0, 50))                 # setgid, group staff
    add(_tarinfo("srv/shared", D, 0o2770, 1001, 1002))     # setgid, svc:svcgrp
    add(_tarinfo("opt", D, 0o755))
    add(_tarinfo("opt/lib", D, 0o711, 5, 6))
    add(_tarinfo("opt/lib/keep.txt", F, 0o600, 5, 6), b"keep\n")
    add(_tarinfo("opt/tool", F, 0o4755), b"#!/bin/sh\necho tool\n")   # setuid file
    add(_tarinfo("opt/old", D, 0o755))
    add(_tarinfo("opt/old/a", F, 0o644), b"a\n")
    add(_tarinfo("opt/old/sub", D, 0o700, 1000, 1000))
    add(_tarinfo("opt/old/sub/b", F, 0o644), b"b\n")
    add(_tarinfo("opt/link", L, 0o777, linkname="old"))
    add(_tarinfo("data", D, 0o700, 1000, 1000))
    add(_tarinfo("var", D, 0o755))
    add(_tarinfo("var/empty", D, 0o555))
    add(_tarinfo("usr", D, 0o755))
    add(_tarinfo("usr/local", D, 0o755))
    add(_tarinfo("usr/local/bin", D, 0o755))
    # Layer 2: files whose parent directories it does not carry (lbuild's base). buildah's base
    # carries them with the metadata layer 1 gives them: containers/storage creates a layer's
    # missing parents 0755 root:root in the layer's own directory, which hides layer 1's metadata
    # in its merged view; containerd's applier (archive/tar.go mkparent) and umoci copy the
    # parents' metadata from below, as Docker's images expect. Both bases have the same merged
    # filesystem under those rules.
    l2: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if explicit_parents:
        l2 += [(_tarinfo(n, D, m, u, g), None) for n, m, u, g in (
            ("srv", 0o2775, 0, 50), ("srv/shared", 0o2770, 1001, 1002), ("opt", 0o755, 0, 0),
            ("opt/lib", 0o711, 5, 6), ("opt/lib/l2", 0o755, 0, 0), ("home", 0o755, 0, 0),
            ("home/app", 0o750, 1000, 1000), ("home/app/.cache", 0o755, 0, 0))]
    l2 += [
        (_tarinfo("srv/shared/from-l2.txt", F, 0o664, 1001, 1002, size=3), b"l2\n"),
        (_tarinfo("opt/lib/l2/inner.txt", F, 0o644, size=6), b"inner\n"),
        (_tarinfo("home/app/.cache/l2", F, 0o600, 1000, 1000, size=3), b"l2\n"),
    ]
    return [l1, l2]


def make_base_layout(dest: Path, *, explicit_parents: bool = False) -> Path:
    """Write the base image as an OCI layout at ``dest`` (tag ``latest``) with umoci."""
    work = dest.parent / (dest.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    run("umoci", "init", "--layout", dest)
    run("umoci", "new", "--image", f"{dest}:latest")
    for i, entries in enumerate(_base_layers(explicit_parents)):
        tar_path = work / f"layer{i}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in entries:
                tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        run("umoci", "raw", "add-layer", "--image", f"{dest}:latest", tar_path)
    cfg_args = [f"--config.env={e}" for e in BASE_ENV]
    run("umoci", "config", "--image", f"{dest}:latest", *cfg_args, "--config.cmd=/bin/sh")
    shutil.rmtree(work)
    return dest


# ---------------------------------------------------------------------------------------------
# The builders


@dataclasses.dataclass
class Env:
    """What every case shares within one pytest process."""

    base: Path
    base_paths: set[str]
    n_base: int
    buildah: Buildah
    home: Path


def _unmount_under(root: Path) -> None:
    prefix = str(root) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for m in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        run("umount", m, check=False)


def sweep_stale_stores() -> None:
    """Unmount what the buildah stores of dead conformance sessions left mounted (a session
    killed before its teardown): a store whose owner.pid names no live process."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    roots = {m.split("/graph/overlay")[0] for m in mounts
             if "/buildah/graph/overlay" in m and "/conformance" in m}
    for r in roots:
        owner = Path(r) / "owner.pid"
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue  # not ours to judge
        if not Path(f"/proc/{pid}").exists():
            _unmount_under(Path(r))


class Buildah:
    """A private buildah store holding the base image as localhost/base:latest."""

    def __init__(self, root: Path, base: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        (root / "owner.pid").write_text(str(os.getpid()))
        conf = root / "storage.conf"
        conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\n'
                        f'runroot = "{root}/run"\n')
        self.env = dict(os.environ)
        self.env["CONTAINERS_STORAGE_CONF"] = str(conf)
        # A registries.conf that knows no registry: short names resolve locally only.
        reg = root / "registries.conf"
        reg.write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
        self.env["CONTAINERS_REGISTRIES_CONF"] = str(reg)
        self.env["BUILDAH_ISOLATION"] = "chroot"
        self.env.pop("SOURCE_DATE_EPOCH", None)
        self.env["TMPDIR"] = str(root / "tmp")
        (root / "tmp").mkdir(exist_ok=True)
        run("skopeo", "copy", f"oci:{base}:latest", "containers-storage:localhost/base:latest",
            env=self.env)
        self.n = 0

    def close(self) -> None:
        """Remove every container and image, then unmount what the overlay driver left
        mounted under the store (its graph dir is a bind mount of its own), so the temp dir can
        be deleted."""
        run("buildah", "rm", "--all", env=self.env, check=False)
        run("buildah", "rmi", "--all", "--force", env=self.env, check=False)
        _unmount_under(self.root)

    def build(self, context: Path, dockerfile: Path, out: Path, *, build_args: dict[str, str],
              target: str | None) -> None:
        self.n += 1
        iid = self.root / f"iid{self.n}"
        args: list[str] = ["buildah", "bud", "--isolation", "chroot", "--pull=never",
                           "--format", "oci", "--layers", "--timestamp", "0",
                           "-f", str(dockerfile), "--iidfile", str(iid)]
        for k, v in build_args.items():
            args += ["--build-arg", f"{k}={v}"]
        if target:
            args += ["--target", target]
        run(*args, str(context), env=self.env)
        run("buildah", "push", "--format", "oci", "--disable-compression", iid.read_text().strip(),
            f"oci:{out}:latest",
            env=self.env)


def build_lbuild(context: Path, dockerfile: Path, out: Path, *, home: Path, base: Path,
                 build_args: dict[str, str], target: str | None,
                 extra: tuple[str, ...] = ()) -> None:
    env = dict(os.environ)
    env["LBUILD_HOME"] = str(home)
    env["SOURCE_DATE_EPOCH"] = "0"
    # The lbuild command line, run as `python -m builder` (what the `lbuild` script runs; the
    # script itself may be missing for a moment while another agent reinstalls the package).
    args: list[str] = [sys.executable, "-m", "builder", "build", "-f", str(dockerfile),
                       "--build-context", f"base=oci-layout://{base}",
                       "--output", f"type=oci,dest={out}", "--progress", "plain"]
    for k, v in build_args.items():
        args += ["--build-arg", f"{k}={v}"]
    if target:
        args += ["--target", target]
    args += extra
    run(*args, str(context), env=env, cwd=ROOT, error=BuildFailed)


# ---------------------------------------------------------------------------------------------
# Reading an image: merged tree from the layer tars


@dataclasses.dataclass
class Entry:
    kind: str              # file dir symlink fifo chr blk
    mode: int              # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int = 0
    digest: str | None = None
    target: str | None = None
    dev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    mtime: int | None = None
    layer: int = -1        # index of the layer that last wrote this path (-1: implied parent)
    inode: int = 0         # hardlinked paths share it
    text: bytes | None = dataclasses.field(default=None, repr=False)  # small files: content


    def public(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("layer", "inode", "mtime", "text"):
            d.pop(k)
        d["mode"] = oct(self.mode)
        d["xattrs"] = {k: v.decode("utf-8", "backslashreplace") for k, v in sorted(self.xattrs.items())}
        return d


@dataclasses.dataclass
class Image:
    tree: dict[str, Entry]
    config: dict[str, Any]
    n_layers: int

    def links(self) -> dict[str, tuple[str, ...]]:
        """path -> every path sharing its inode (only for hardlinked files)."""
        groups: dict[int, list[str]] = {}
        for p, e in self.tree.items():
            if e.kind == "file":
                groups.setdefault(e.inode, []).append(p)
        out: dict[str, tuple[str, ...]] = {}
        for members in groups.values():
            if len(members) > 1:
                for p in members:
                    out[p] = tuple(sorted(members))
        return out


_KINDS = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
          tarfile.SYMTYPE: "symlink", tarfile.FIFOTYPE: "fifo", tarfile.CHRTYPE: "chr",
          tarfile.BLKTYPE: "blk", tarfile.CONTTYPE: "file"}


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.strip("/")
    return "" if name == "." else name


def _open_blob(path: Path) -> io.BufferedIOBase | Any:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    if magic[:3] == b"BZh":
        return bz2.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


_inode_counter = [0]


def _new_inode() -> int:
    _inode_counter[0] += 1
    return _inode_counter[0]


def _apply_layer(tree: dict[str, Entry], blob: Path, index: int) -> None:
    fobj = _open_blob(blob)
    entries: list[tuple[str, tarfile.TarInfo, str | None, bytes | None]] = []
    with fobj, tarfile.open(fileobj=fobj, mode="r|", encoding="utf-8",
                            errors="surrogateescape") as tf:
        for ti in tf:
            digest, text = None, None
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                data = f.read()
                digest = hashlib.sha256(data).hexdigest()
                text = data if len(data) <= 65536 else None
            entries.append((_norm(ti.name), ti, digest, text))

    def remove(path: str) -> None:
        tree.pop(path, None)
        prefix = path + "/"
        for p in [p for p in tree if p.startswith(prefix)]:
            del tree[p]

    # Whiteouts hide lower layers only: apply them all before the layer's own entries.
    for path, _ti, _d, _t in entries:
        base = path.rsplit("/", 1)[-1]
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if base == ".wh..wh..opq":
            prefix = parent + "/" if parent else ""
            for p in [p for p in tree if p.startswith(prefix) and p != parent]:
                del tree[p]
        elif base.startswith(".wh."):
            remove((parent + "/" if parent else "") + base[4:])
    for path, ti, digest, text in entries:
        base = path.rsplit("/", 1)[-1]
        if base.startswith(".wh.") or path == "":
            continue
        parts = path.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if anc not in tree or tree[anc].kind != "dir":
                remove(anc)
                tree[anc] = Entry("dir", 0o755, 0, 0, layer=-1, inode=_new_inode())
        xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                  for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        if ti.islnk():
            src = tree.get(_norm(ti.linkname))
            if src is None:
                raise AssertionError(f"{blob}: hardlink {path} -> missing {ti.linkname}")
            remove(path)
            tree[path] = src   # shared object: same inode
            continue
        kind = _KINDS.get(ti.type)
        if kind is None:
            raise AssertionError(f"{blob}: {path}: unknown tar type {ti.type!r}")
        old = tree.get(path)
        if old is not None and not (old.kind == "dir" and kind == "dir"):
            remove(path)
        tree[path] = Entry(
            kind=kind, mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid,
            size=ti.size if kind == "file" else 0, digest=digest,
            target=ti.linkname if kind == "symlink" else None,
            dev=(ti.devmajor, ti.devminor) if kind in ("chr", "blk") else None,
            xattrs=xattrs, mtime=int(ti.mtime), layer=index, inode=_new_inode(), text=text)


_chain_cache: dict[tuple[str, ...], dict[str, Entry]] = {}


def _blob(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":", 1)
    return layout / "blobs" / algo / hexd


def read_image(layout: Path, tag: str = "latest") -> Image:
    index = json.loads((layout / "index.json").read_text())
    manifests = [m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if not manifests:
        manifests = index["manifests"]
    manifest = json.loads(_blob(layout, manifests[0]["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    diff_ids: list[str] = config["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"]), "diff_ids and layers differ in number"
    tree: dict[str, Entry] = {}
    for i, layer in enumerate(manifest["layers"]):
        key = tuple(diff_ids[: i + 1])
        cached = _chain_cache.get(key)
        if cached is not None:
            tree = copy.copy(cached)
            continue
        _apply_layer(tree, _blob(layout, layer["digest"]), i)
        _chain_cache[key] = copy.copy(tree)
    return Image(tree=tree, config=config, n_layers=len(diff_ids))


# ---------------------------------------------------------------------------------------------
# Comparing

CONFIG_FIELDS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir",
                 "Labels", "StopSignal", "Healthcheck", "Shell", "OnBuild", "ArgsEscaped")


def config_view(img: Image) -> dict[str, Any]:
    c = img.config.get("config") or {}
    out: dict[str, Any] = {}
    for k in CONFIG_FIELDS:
        v = c.get(k)
        if k == "Labels" and v:
            v = {lk: lv for lk, lv in v.items() if lk != "io.buildah.version"} or None
        if v in (None, {}, [], ""):
            continue
        out[k] = v
    out["architecture"] = img.config.get("architecture")
    out["os"] = img.config.get("os")
    return out


def _mtime_comparable(a: Entry, b: Entry, n_base: int) -> bool:
    # Directories a build step touched: BuildKit gives them the time of the change (or
    # SOURCE_DATE_EPOCH), buildah --timestamp 0 gives 0, lbuild clamps to SOURCE_DATE_EPOCH or
    # keeps the lower layer's: not defined the same way; everything else is.
    touched = a.layer >= n_base or b.layer >= n_base or a.layer < 0 or b.layer < 0
    return not (a.kind == "dir" and touched)


Patch = dict[str, dict[str, Any] | None]


def expected_tree(peer: Image, patch: Patch, ignore: tuple[str, ...], base_paths: set[str],
                  adjust: Callable[[dict[str, Entry]], None] | None = None) -> dict[str, Entry]:
    """buildah's tree with its RUN noise removed and the case's BuildKit corrections applied."""
    tree: dict[str, Entry] = {}
    for p, e in peer.tree.items():
        if _ignored(p, ignore):
            continue
        if any(p == n or p.startswith(n + "/") for n in BUILDAH_RUN_NOISE) and p not in base_paths:
            continue
        tree[p] = e
    for p, fields in patch.items():
        if fields is None:
            tree.pop(p, None)
            continue
        old = tree.get(p)
        if old is None:
            new = Entry(kind=fields.get("kind", "file"), mode=0, uid=0, gid=0, layer=10**6,
                        inode=_new_inode())
        else:
            new = dataclasses.replace(old)
        for k, v in fields.items():
            setattr(new, k, v)
        tree[p] = new
    if adjust is not None:
        adjust(tree)
    return tree


def _text_diff(path: str, ours: bytes, want: bytes, limit: int = 30) -> list[str]:
    """The first lines of a unified diff of two small files (expected -> lbuild)."""
    lines = list(difflib.unified_diff(
        want.decode("utf-8", "backslashreplace").splitlines(),
        ours.decode("utf-8", "backslashreplace").splitlines(),
        f"expected/{path}", f"lbuild/{path}", n=0, lineterm=""))
    more = [f"    ... {len(lines) - limit} more diff lines"] if len(lines) > limit else []
    return ["    " + line for line in lines[:limit]] + more


def _ignored(p: str, ignore: tuple[str, ...]) -> bool:
    return any(p == i or p.startswith(i + "/") for i in ignore)


def compare(ours: Image, peer: Image, *, n_base: int, patch: Patch, ignore: tuple[str, ...],
            config_patch: dict[str, Any], base_paths: set[str], mtimes: bool = True,
            adjust: Callable[[dict[str, Entry]], None] | None = None) -> list[str]:
    """Every difference between lbuild's image and the expected one, one line each."""
    diffs: list[str] = []
    want = expected_tree(peer, patch, ignore, base_paths, adjust)
    have = {p: e for p, e in ours.tree.items() if not _ignored(p, ignore)}
    for p in sorted(set(want) | set(have)):
        w, h = want.get(p), have.get(p)
        if w is None:
            diffs.append(f"{p!r}: only in lbuild's image: {h.public() if h else None}")
            continue
        if h is None:
            diffs.append(f"{p!r}: missing from lbuild's image (expected {w.public()})")
            continue
        wd, hd = w.public(), h.public()
        for k in wd:
            if wd[k] != hd[k]:
                diffs.append(f"{p!r}: {k}: lbuild {hd[k]!r}, expected {wd[k]!r}")
        if wd["digest"] != hd["digest"] and w.text is not None and h.text is not None:
            diffs.extend(_text_diff(p, h.text, w.text))
        if mtimes and _mtime_comparable(h, w, n_base) and h.mtime != w.mtime:
            diffs.append(f"{p!r}: mtime: lbuild {h.mtime}, expected {w.mtime}")
    wl, hl = peer.links(), ours.links()
    for p in sorted(set(wl) | set(hl)):
        if _ignored(p, ignore) or p in patch:
            continue
        if wl.get(p) != hl.get(p):
            diffs.append(f"{p!r}: hardlinks: lbuild {hl.get(p)}, expected {wl.get(p)}")
    wc, hc = config_view(peer), config_view(ours)
    for k, v in config_patch.items():
        if v is None:
            wc.pop(k, None)
        else:
            wc[k] = v
    for k in sorted(set(wc) | set(hc)):
        if wc.get(k) != hc.get(k):
            diffs.append(f"config {k}: lbuild {hc.get(k)!r}, expected {wc.get(k)!r}")
    return diffs


# ---------------------------------------------------------------------------------------------
# Cases

Files = dict[str, "str | bytes | Callable[[Path], None]"]


@dataclasses.dataclass
class Case:
    """One Dockerfile built by both builders.

    ``patch``/``adjust``/``config_patch``: where buildah differs from BuildKit, the BuildKit
    result that lbuild is checked against instead (``buildkit`` says which source file defines
    it): ``patch`` sets fields of single paths (None drops a path), ``adjust`` edits the
    expected tree (path -> Entry; replace entries, never mutate them: they are shared).
    ``buildah_dockerfile``: buildah 1.28 cannot parse some spellings (``--link``): its version.
    """

    id: str
    dockerfile: str
    checks: str
    files: dict[str, Any] = dataclasses.field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    build_args: dict[str, str] = dataclasses.field(default_factory=dict)
    target: str | None = None
    lbuild_args: tuple[str, ...] = ()
    buildah_dockerfile: str | None = None
    patch: Patch = dataclasses.field(default_factory=dict)
    adjust: Callable[[dict[str, Entry]], None] | None = None
    config_patch: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    mtimes: bool = True
    buildkit: str = ""
    xfail: str = ""

    def write_context(self, ctx: Path) -> None:
        ctx.mkdir(parents=True, exist_ok=True)
        for rel, content in self.files.items():
            p = ctx / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(p)
            elif isinstance(content, str):
                p.write_text(content)
            else:
                p.write_bytes(content)
        if self.setup is not None:
            self.setup(ctx)
