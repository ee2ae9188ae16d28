"""Contract suite for cache/snapshot.py, run against both snapshotters on real directories.

The tests mount snapshots in the host namespace under tmp_path (we are root) and always
unmount them again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from cache.errors import AlreadyExists, DigestMismatch, InvalidInput, NotFound, StoreError
from cache.snapshots.base import LayerStacks
from cache.snapshots.snapshot import (
    CopySnapshotter,
    OverlaySnapshotter,
    Snapshotter,
    chain_id,
    choose_snapshotter,
    cleanup_stale,
    ensure_chain,
    mount_all,
    unmount,
)
from cache.types import Digest, Entry

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["overlay", "copy"]
T0 = 1_000_000_000  # every base file's mtime
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts snapshots: needs root")


def make(kind: str, root: Path) -> Snapshotter:
    return OverlaySnapshotter(root) if kind == "overlay" else CopySnapshotter(root)


@pytest.fixture(params=KINDS)
def snap(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Snapshotter]:
    s = make(request.param, tmp_path / "snaps")
    yield s
    s.close()


@contextlib.contextmanager
def mounted(s: Snapshotter, key: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    mount_all(s.mounts(key), where)
    try:
        yield where
    finally:
        unmount(where)


def write(p: Path, data: bytes, mode: int = 0o644, mtime: int = T0) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    os.utime(p, (mtime, mtime))


def build_base(root: Path) -> None:
    write(root / "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    write(root / "etc/conf/a.conf", b"a=1\n")
    write(root / "etc/conf/b.conf", b"b=2\n")
    write(root / "usr/bin/tool", b"tool v1\n", 0o755)
    write(root / "usr/lib/lib.so", b"\x7fELF" + bytes(100))
    write(root / "data/x", b"x")
    write(root / "data/sub/y", b"y")
    write(root / "file_to_dir", b"i am a file")
    write(root / "dir_to_file/child", b"c")
    os.symlink("usr/bin/tool", root / "link")
    os.utime(root / "link", (T0, T0), follow_symlinks=False)
    for d, _dirs, _files in os.walk(root):
        os.utime(d, (T0, T0))


def second_layer(root: Path) -> None:
    write(root / "usr/bin/tool2", b"tool2\n", 0o755)
    os.unlink(root / "data/x")


def prepare_stack(s: Snapshotter, tmp: Path) -> str:
    """Commit 'base' and 'l2' on top of it; return the name of the top."""
    s.prepare("k-base", None)
    with mounted(s, "k-base", tmp / "m-base") as r:
        build_base(r)
    s.commit("base", "k-base")
    s.prepare("k-l2", "base")
    with mounted(s, "k-l2", tmp / "m-l2") as r:
        second_layer(r)
    s.commit("l2", "k-l2")
    return "l2"


def run_change(s: Snapshotter, tmp: Path, change: Callable[[Path], None]) -> list[Entry]:
    top = prepare_stack(s, tmp)
    s.prepare("k", top)
    with mounted(s, "k", tmp / "m") as r:
        change(r)
    return s.diff("k")


# -- the changes ----------------------------------------------------------------------------
def ch_create_modify_delete(r: Path) -> None:
    write(r / "etc/new.conf", b"new")
    write(r / "usr/bin/tool", b"tool v2 longer\n", 0o755)
    os.unlink(r / "etc/conf/b.conf")
    subprocess.run(["rm", "-rf", str(r / "data")], check=True)


def ch_dir_mtime_only(r: Path) -> None:
    write(r / "etc/tmpfile", b"t")
    os.unlink(r / "etc/tmpfile")


def ch_replace_types(r: Path) -> None:
    os.unlink(r / "file_to_dir")
    write(r / "file_to_dir/inner", b"inner")
    subprocess.run(["rm", "-rf", str(r / "dir_to_file")], check=True)
    write(r / "dir_to_file", b"now a file")


def ch_recreate_dir(r: Path) -> None:
    subprocess.run(["rm", "-rf", str(r / "etc/conf")], check=True)
    write(r / "etc/conf/c.conf", b"c=3\n")


def ch_links_xattrs_setuid(r: Path) -> None:
    os.symlink("etc/passwd", r / "newlink")
    os.unlink(r / "link")
    os.symlink("usr/bin/tool2", r / "link")
    write(r / "usr/bin/h1", b"hard")
    os.link(r / "usr/bin/h1", r / "usr/bin/h2")
    os.setxattr(r / "etc/passwd", "user.tag", b"v")
    os.chmod(r / "usr/bin/tool", 0o4755)
    os.mkfifo(r / "fifo")
    os.mknod(r / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for p in ("newlink", "link", "fifo", "null"):
        # Fixed times: the runs compared happen at different moments.
        os.utime(r / p, (T0 + 7, T0 + 7), follow_symlinks=False)


def ch_dir_metadata(r: Path) -> None:
    os.chmod(r / "data/sub", 0o700)
    os.chown(r / "etc/conf", 1000, 1000)


def ch_touch(r: Path) -> None:
    os.utime(r / "usr/lib/lib.so", (T0 + 5, T0 + 5))


def ch_same_content_same_mtime(r: Path) -> None:
    write(r / "etc/passwd", b"root:x:0:0::/root:/bin/sh\n")


def ch_same_size_same_mtime_new_content(r: Path) -> None:
    write(r / "etc/passwd", b"ROOT:X:0:0::/ROOT:/BIN/SH\n")


def ch_lower_deleted_file(r: Path) -> None:
    # data/x was deleted by l2: a new file there is plain, not a replacement.
    write(r / "data/x", b"back")


CHANGES: dict[str, tuple[Callable[[Path], None], list[tuple[str, str]]]] = {
    "create-modify-delete": (
        ch_create_modify_delete,
        [
            ("data", "whiteout"),
            ("etc", "dir"),
            ("etc/conf", "dir"),
            ("etc/conf/b.conf", "whiteout"),
            ("etc/new.conf", "file"),
            ("usr", "dir"),
            ("usr/bin", "dir"),
            ("usr/bin/tool", "file"),
        ],
    ),
    "dir-mtime-only": (ch_dir_mtime_only, []),
    "replace-types": (
        ch_replace_types,
        [
            ("dir_to_file", "file"),
            ("file_to_dir", "dir"),
            ("file_to_dir", "opaque"),
            ("file_to_dir/inner", "file"),
        ],
    ),
    "recreate-dir": (
        ch_recreate_dir,
        [("etc", "dir"), ("etc/conf", "dir"), ("etc/conf", "opaque"), ("etc/conf/c.conf", "file")],
    ),
    "links-xattrs-setuid": (
        ch_links_xattrs_setuid,
        [
            ("etc", "dir"),
            ("etc/passwd", "file"),
            ("fifo", "fifo"),
            ("link", "symlink"),
            ("newlink", "symlink"),
            ("null", "char"),
            ("usr", "dir"),
            ("usr/bin", "dir"),
            ("usr/bin/h1", "file"),
            ("usr/bin/h2", "hardlink"),
            ("usr/bin/tool", "file"),
        ],
    ),
    "dir-metadata": (
        ch_dir_metadata,
        [("data", "dir"), ("data/sub", "dir"), ("etc", "dir"), ("etc/conf", "dir")],
    ),
    "touch": (ch_touch, [("usr", "dir"), ("usr/lib", "dir"), ("usr/lib/lib.so", "file")]),
    "same-content-same-mtime": (ch_same_content_same_mtime, []),
    "same-size-new-content": (
        ch_same_size_same_mtime_new_content,
        [("etc", "dir"), ("etc/passwd", "file")],
    ),
    "lower-deleted-file": (ch_lower_deleted_file, [("data", "dir"), ("data/x", "file")]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_diff(snap: Snapshotter, tmp_path: Path, change: str) -> None:
    fn, expected = CHANGES[change]
    entries = run_change(snap, tmp_path, fn)
    assert [(e.path, e.type) for e in entries] == expected
    for e in entries:
        if e.type == "file":
            assert e.source is not None and e.source.host_path is not None
            data = Path(e.source.host_path).read_bytes()
            assert len(data) == e.size
            import blake3

            assert blake3.blake3(data).hexdigest() == e.digest


def test_diff_details(snap: Snapshotter, tmp_path: Path) -> None:
    by_path = {
        e.path: e for e in run_change(snap, tmp_path, ch_links_xattrs_setuid) if e.type != "opaque"
    }
    assert by_path["usr/bin/tool"].mode == 0o4755
    assert by_path["etc/passwd"].xattrs == (("user.tag", b"v"),)
    assert by_path["usr/bin/h2"].link == "usr/bin/h1"
    assert by_path["link"].link == "usr/bin/tool2"
    assert (by_path["null"].devmajor, by_path["null"].devminor) == (1, 3)
    assert by_path["usr/bin"].mode == 0o755


def _normal(entries: list[Entry]) -> list[Entry]:
    # Directory mtimes are "now" in each run: the only field allowed to differ.
    return [dataclasses.replace(e, mtime=0) if e.type == "dir" else e for e in entries]


@pytest.mark.parametrize("change", list(CHANGES))
def test_both_snapshotters_agree(tmp_path: Path, change: str) -> None:
    fn, _expected = CHANGES[change]
    results = []
    for kind in KINDS:
        s = make(kind, tmp_path / kind / "snaps")
        try:
            results.append(_normal(run_change(s, tmp_path / kind, fn)))
        finally:
            s.close()
    assert results[0] == results[1]


def test_layers_are_byte_identical_and_round_trip(tmp_path: Path) -> None:
    layer = pytest.importorskip("cache.layers.tar")
    from cache.layers.apply import apply_layer
    from cache.store.blobs import BlobStore

    def change(r: Path) -> None:
        ch_create_modify_delete(r)
        ch_replace_types(r)
        ch_links_xattrs_setuid(r)
        # Everything the change made gets a fixed mtime: the two runs happen at other times.
        made = (
            "etc",
            "etc/conf",
            "usr",
            "usr/bin",
            "file_to_dir",
            ".",
            "newlink",
            "link",
            "fifo",
            "null",
        )
        for p in made:
            os.utime(r / p, (T0 + 9, T0 + 9), follow_symlinks=False)

    diff_ids = []
    for kind in KINDS:
        s = make(kind, tmp_path / kind / "snaps")
        try:
            entries = run_change(s, tmp_path / kind, change)
            store = BlobStore(tmp_path / kind / "store")
            info = layer.write_layer(entries, store)
            diff_ids.append(info.diff_id)
            # Applying the layer onto a copy of the parent gives the active snapshot's tree.
            copy_root = tmp_path / kind / "replay"
            s.view("v", "l2")
            with mounted(s, "v", tmp_path / kind / "mv") as r:
                subprocess.run(["cp", "-a", f"{r}/.", str(copy_root)], check=True)
            with store.open(info.diff_id) as f:
                apply_layer(f, copy_root, expected=info.diff_id)
            with mounted(s, "k", tmp_path / kind / "mk") as r:
                assert tree(copy_root) == tree(r)
            s.remove("v")
        finally:
            s.close()
    assert diff_ids[0] == diff_ids[1]


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_rdev, content)
    return out


# -- lifecycle ------------------------------------------------------------------------------
def test_lifecycle(snap: Snapshotter, tmp_path: Path) -> None:
    assert not snap.exists("base")
    mounts = snap.prepare("k1", None)
    assert mounts and mounts[0].target == "/"
    with pytest.raises(AlreadyExists):
        snap.prepare("k1", None)
    with mounted(snap, "k1", tmp_path / "m1") as r:
        write(r / "hello", b"hi")
    snap.commit("base", "k1")
    assert snap.exists("base")
    with pytest.raises(NotFound):
        snap.mounts("k1")
    snap.prepare("k2", "base")
    with pytest.raises(AlreadyExists):
        snap.commit("base", "k2")
    snap.mounts("k2")  # still there after the failed commit
    with pytest.raises(StoreError):
        snap.remove("base")  # k2 is its child
    snap.remove("k2")
    with pytest.raises(NotFound):
        snap.mounts("k2")
    snap.remove("base")
    assert not snap.exists("base")
    with pytest.raises(NotFound):
        snap.remove("base")
    with pytest.raises(NotFound):
        snap.prepare("k3", "no-such-parent")


def test_prepare_sees_parent_and_does_not_change_it(snap: Snapshotter, tmp_path: Path) -> None:
    top = prepare_stack(snap, tmp_path)
    snap.prepare("k", top)
    with mounted(snap, "k", tmp_path / "m") as r:
        assert (r / "usr/bin/tool2").read_bytes() == b"tool2\n"
        assert not (r / "data/x").exists()
        assert (r / "etc/passwd").read_bytes().startswith(b"root")
        write(r / "etc/passwd", b"changed")
    snap.view("v", top)
    with mounted(snap, "v", tmp_path / "mv") as r:
        assert (r / "etc/passwd").read_bytes().startswith(b"root")
        with pytest.raises(OSError) as err:
            (r / "new").write_bytes(b"x")
        assert err.value.errno == errno.EROFS
    with pytest.raises(InvalidInput):
        snap.commit("nope", "v")
    snap.remove("v")


def test_view_over_one_and_several_layers(snap: Snapshotter, tmp_path: Path) -> None:
    prepare_stack(snap, tmp_path)
    snap.view("v1", "base")
    with mounted(snap, "v1", tmp_path / "m1") as r:
        assert (r / "data/x").exists()
    snap.view("v2", "l2")
    with mounted(snap, "v2", tmp_path / "m2") as r:
        assert not (r / "data/x").exists()
        assert (r / "usr/bin/tool2").exists()


def test_chain_id() -> None:
    a = Digest("sha256:" + "a" * 64)
    b = Digest("sha256:" + "b" * 64)
    assert chain_id([a]) == a
    want = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chain_id([a, b]) == want
    with pytest.raises(InvalidInput):
        chain_id([])


# -- ensure_chain -------------------------------------------------------------------------
def _tar(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = T0
            tf.addfile(ti, io.BytesIO(data))
        for name in whiteouts:
            d, _, base = name.rpartition("/")
            tf.addfile(tarfile.TarInfo(f"{d}/.wh.{base}" if d else f".wh.{base}"))
    return buf.getvalue()


def _digest(b: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(b).hexdigest())


def _opener(layers: list[bytes]) -> tuple[list[Digest], Callable[[Digest], BinaryIO], list[Digest]]:
    """The layers' digests, an ``open_layer`` over them, and the digests it opened so far."""
    ids = [_digest(t) for t in layers]
    by_id = dict(zip(ids, layers, strict=True))
    opened: list[Digest] = []

    def open_layer(d: Digest) -> BinaryIO:
        opened.append(d)
        return io.BytesIO(by_id[d])

    return ids, open_layer, opened


def test_ensure_chain(snap: Snapshotter, tmp_path: Path) -> None:
    layers = [_tar({"a": b"1", "d/b": b"2"}), _tar({"c": b"3"}, whiteouts=("d/b",))]
    ids, open_layer, opened = _opener(layers)
    top = ensure_chain(snap, ids, open_layer)
    assert top == chain_id(ids)
    # overlay: a stack per prefix (they share the layer directories); copy: one tree, made
    # once, with no copy of the tree per prefix on the way
    assert snap.exists(chain_id(ids[:1])) == isinstance(snap, LayerStacks)
    assert ensure_chain(snap, ids, open_layer) == top
    assert opened == ids  # the second call opened nothing
    snap.view("v", top)
    with mounted(snap, "v", tmp_path / "m") as r:
        assert sorted(os.listdir(r)) == ["a", "c", "d"]
        assert os.listdir(r / "d") == []


def test_copy_chain_is_made_from_the_longest_committed_prefix(tmp_path: Path) -> None:
    """The copy snapshotter copies the longest committed prefix once and applies only the
    layers above it."""
    ids, open_layer, opened = _opener([_tar({"a": b"1"}), _tar({"b": b"2"}), _tar({"c": b"3"})])
    snap = CopySnapshotter(tmp_path / "copy")
    assert ensure_chain(snap, ids[:1], open_layer) == chain_id(ids[:1])
    opened.clear()
    top = ensure_chain(snap, ids, open_layer)
    assert opened == ids[1:]
    assert not snap.exists(chain_id(ids[:2]))
    snap.view("v", top)
    with mounted(snap, "v", tmp_path / "m") as r:
        assert sorted(os.listdir(r)) == ["a", "b", "c"]


def test_ensure_chain_digest_mismatch_commits_nothing(snap: Snapshotter, tmp_path: Path) -> None:
    good = _tar({"a": b"1"})
    claimed = _digest(b"not the layer")
    with pytest.raises(DigestMismatch):
        ensure_chain(snap, [claimed], lambda _d: io.BytesIO(good))
    assert not snap.exists(chain_id([claimed]))
    assert os.listdir(tmp_path / "snaps" / "active") == []


def test_ensure_chain_concurrent_processes(tmp_path: Path) -> None:
    layers = [_tar({f"f{i}": bytes(200_000) for i in range(20)}), _tar({"x": b"x"})]
    paths = []
    for i, t in enumerate(layers):
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(t)
        paths.append(str(p))
    ids = [_digest(t) for t in layers]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from cache.snapshots.snapshot import CopySnapshotter, OverlaySnapshotter, ensure_chain
        kind, root = sys.argv[1], Path(sys.argv[2])
        s = (OverlaySnapshotter if kind == "overlay" else CopySnapshotter)(root)
        files = dict(zip({ids!r}, {paths!r}))
        print(ensure_chain(s, {ids!r}, lambda d: open(files[d], "rb")))
        """
    )
    for kind in KINDS:
        root = tmp_path / kind
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, kind, str(root)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        outs = [p.communicate(timeout=60)[0].strip() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0]
        assert outs == [chain_id(ids)] * 3
        assert len(os.listdir(root / "committed")) == (2 if kind == "overlay" else 1)
        assert os.listdir(root / "active") == []


# -- choosing and cleaning ------------------------------------------------------------------
def test_choose_snapshotter(tmp_path: Path) -> None:
    assert isinstance(choose_snapshotter(tmp_path / "a"), OverlaySnapshotter)
    assert isinstance(choose_snapshotter(tmp_path / "b", prefer="copy"), CopySnapshotter)
    with pytest.raises(InvalidInput):
        choose_snapshotter(tmp_path / "c", prefer="zfs")
    assert os.listdir(tmp_path / "a" / "tmp") == []


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


@pytest.mark.parametrize("kind", KINDS)
def test_cleanup_stale_after_a_crash(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "snaps"
    live = make(kind, root)
    live.prepare("live", None)
    crash = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from cache.snapshots.snapshot import CopySnapshotter, OverlaySnapshotter, mount_all
        root = Path({str(root)!r})
        s = ({"OverlaySnapshotter" if kind == "overlay" else "CopySnapshotter"})(root)
        s.prepare("crashed-base", None)
        s.commit("base", "crashed-base")
        mounts = s.prepare("crashed", "base")
        target = root / "tmp" / "mnt"
        target.mkdir()
        mount_all(mounts, target)
        os._exit(0)  # no cleanup at all
        """
    )
    subprocess.run([sys.executable, "-c", crash], check=True)
    assert _mounts_under(root)
    removed = cleanup_stale(root)
    assert any("crashed" in r for r in removed)
    assert _mounts_under(root) == []
    assert sorted(os.listdir(root / "active")) == ["live"]  # held by a live snapshotter
    assert os.listdir(root / "tmp") == []
    assert live.exists("base")
    live.close()
    cleanup_stale(root)
    assert os.listdir(root / "active") == []
