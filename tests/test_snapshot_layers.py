"""Snapshots per layer, by content (issue 16 item 1), checked against their tables of
contents (issue 11 item 9): an edit extracts only the layers whose content changed; a layer
that lacks its parent directories shows the lower layers' ones; ``verify_snapshots`` finds a
changed byte and repairs it; ``prune_snapshots`` drops what no blob or chain backs."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import run_fixtures
from run_fixtures import build
from util import lbuild

from cache.layers.tar import write_layer
from cache.snapshots.snapshot import (
    CopySnapshotter,
    OverlaySnapshotter,
    Snapshotter,
    ensure_chain,
    mount_all,
    unmount,
)
from cache.snapshots.verify import prune_snapshots, verify_snapshots
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Digest, Entry, LayerInfo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts snapshots: needs root")
busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome
T = 1_500_000_000


def f(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(
        path=path, type="file", mode=mode, size=len(data), mtime=T, source=ContentRef(data=data)
    )


def d(path: str, mode: int = 0o755, uid: int = 0) -> Entry:
    return Entry(path=path, type="dir", mode=mode, uid=uid, gid=uid, mtime=T - 100)


class Layers:
    """Layers in a store, and an ``open_layer`` that counts what it opens."""

    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root / "blobs")
        self.tocs: dict[Digest, tuple[Entry, ...]] = {}
        self.opened: list[Digest] = []

    def add(self, *entries: Entry) -> Digest:
        info: LayerInfo = write_layer(list(entries), self.store)
        self.tocs[info.diff_id] = info.toc
        return info.diff_id

    def add_tar(self, *dirs: tuple[str, int]) -> Digest:
        """A layer of directories written by tarfile (a root entry, ``./``, included)."""
        import io
        import tarfile

        from cache.layers.compress import import_layer

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, mode in dirs:
                ti = tarfile.TarInfo(name)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, T
                tf.addfile(ti)
        buf.seek(0)
        info = import_layer(self.store, buf, "application/vnd.oci.image.layer.v1.tar")
        self.tocs[info.diff_id] = info.toc
        return info.diff_id

    def open(self, diff_id: Digest) -> BinaryIO:
        self.opened.append(diff_id)
        return self.store.open(diff_id)

    def toc(self, diff_id: Digest) -> tuple[Entry, ...]:
        return self.tocs[diff_id]

    def toc_or_none(self, diff_id: Digest) -> tuple[Entry, ...] | None:
        return self.tocs.get(diff_id) if self.store.has(diff_id) else None


@contextlib.contextmanager
def shown(s: Snapshotter, top: str, where: Path) -> Iterator[Path]:
    s.view("v", top)
    where.mkdir(parents=True, exist_ok=True)
    mount_all(s.mounts("v"), where)
    try:
        yield where
    finally:
        unmount(where)
        s.remove("v")


def base_layers(ls: Layers) -> list[Digest]:
    return [
        ls.add(d("etc"), f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"), d("tmp", 0o1777)),
        # a layer from elsewhere: no entry for tmp/, the directory it writes into
        ls.add(f("tmp/a.txt", b"a1\n")),
        ls.add(d("home"), d("home/app", 0o750, 1000), f("home/app/x", b"x\n")),
    ]


def test_an_edit_extracts_only_the_changed_layer(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    snap = OverlaySnapshotter(tmp_path / "snaps")
    chain = base_layers(ls)
    top = ensure_chain(snap, chain, ls.open, ls.toc)
    assert sorted(ls.opened) == sorted(chain)
    assert len(list((tmp_path / "snaps/layers").iterdir())) == 3
    with shown(snap, top, tmp_path / "m1") as r:
        st = os.lstat(r / "tmp")
        # the directory the second layer does not carry is the first layer's
        assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (0o1777, T - 100)
        assert (r / "tmp/a.txt").read_bytes() == b"a1\n"
        assert stat.S_IMODE(os.lstat(r / "home/app").st_mode) == 0o750
    ls.opened.clear()
    edited = [chain[0], ls.add(f("tmp/a.txt", b"a2 edited\n")), chain[2]]
    top2 = ensure_chain(snap, edited, ls.open, ls.toc)
    assert ls.opened == [edited[1]]  # the layers above the edit are shared, not extracted
    assert len(list((tmp_path / "snaps/layers").iterdir())) == 4
    with shown(snap, top2, tmp_path / "m2") as r:
        assert (r / "tmp/a.txt").read_bytes() == b"a2 edited\n"
        assert (r / "home/app/x").read_bytes() == b"x\n"
        assert stat.S_IMODE(os.lstat(r / "tmp").st_mode) == 0o1777


def test_a_layer_on_other_parent_directories_is_its_own_directory(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    snap = OverlaySnapshotter(tmp_path / "snaps")
    top_layer = ls.add(f("tmp/a.txt", b"a\n"))
    one = ensure_chain(snap, [ls.add(d("tmp", 0o1777)), top_layer], ls.open, ls.toc)
    two = ensure_chain(snap, [ls.add(d("tmp", 0o700)), top_layer], ls.open, ls.toc)
    modes = []
    for i, top in enumerate((one, two)):
        with shown(snap, top, tmp_path / f"m{i}") as r:
            modes.append(stat.S_IMODE(os.lstat(r / "tmp").st_mode))
    assert modes == [0o1777, 0o700]
    assert len(list((tmp_path / "snaps/layers").iterdir())) == 4


def test_a_layer_carrying_its_parents_is_one_directory_on_any_layers(tmp_path: Path) -> None:
    """A layer that carries every parent directory of its entries (a COPY's) makes the same
    directory whatever is below it (the root's metadata never enters a layer directory):
    chains on other roots share it, and the view of the layers below is not made for it."""
    ls = Layers(tmp_path)
    snap = OverlaySnapshotter(tmp_path / "snaps")
    carried = ls.add(d("app", 0o750), f("app/x", b"x\n"))
    roots = [ls.add_tar(("./", 0o755), ("tmp/", 0o1777)), ls.add_tar(("./", 0o700), ("app/", 0o755))]
    # bases that carry a root of their own, each another
    assert [(ls.toc(r)[0].type, ls.toc(r)[0].mode) for r in roots] == [("dir", 0o755), ("dir", 0o700)]
    asked: list[int] = []

    def views(below: object) -> object:
        asked.append(len(below))  # type: ignore[arg-type]
        raise AssertionError("the layers below were looked at")

    tops = [ensure_chain(snap, [r], ls.open, ls.toc) for r in roots]
    ls.opened.clear()
    tops = [
        ensure_chain(snap, [r, carried], ls.open, ls.toc, views=views)  # type: ignore[arg-type]
        for r in roots
    ]
    assert ls.opened == [carried] and not asked  # made once, shared by both chains
    assert len(list((tmp_path / "snaps/layers").iterdir())) == 3
    for i, top in enumerate(tops):
        with shown(snap, top, tmp_path / f"m{i}") as r:
            assert stat.S_IMODE(os.lstat(r / "app").st_mode) == 0o750
            assert (r / "app/x").read_bytes() == b"x\n"


@pytest.mark.parametrize("kind", ["overlay", "copy"])
def test_verify_finds_a_changed_byte_and_repairs_it(tmp_path: Path, kind: str) -> None:
    ls = Layers(tmp_path)
    root = tmp_path / "snapshots"
    snap: Snapshotter = (
        OverlaySnapshotter(root / kind) if kind == "overlay" else CopySnapshotter(root / kind)
    )
    chain = base_layers(ls)
    top = ensure_chain(snap, chain, ls.open, ls.toc)
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []
    # root on the host changes a committed snapshot behind lbuild's back
    victims = [p for p in root.rglob("passwd") if p.is_file() and "etc" in p.parts]
    assert victims
    for p in victims:
        st = p.stat()
        data = bytearray(p.read_bytes())
        data[0] ^= 1
        p.write_bytes(bytes(data))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: only bytes
    found = verify_snapshots(root, ls.toc_or_none, ls.open)
    assert found and all("differ" in line or "removed" in line for line in found), found
    assert any("etc/passwd: content" in line for line in found), found
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []
    top = ensure_chain(snap, chain, ls.open, ls.toc)
    with shown(snap, top, tmp_path / "m") as r:
        assert (r / "etc/passwd").read_bytes() == b"root:x:0:0::/root:/bin/sh\n"


def test_verify_notices_extra_and_mode_changes(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    root = tmp_path / "snapshots"
    snap = OverlaySnapshotter(root / "overlay")
    ensure_chain(snap, base_layers(ls), ls.open, ls.toc)
    layer_dirs = sorted((root / "overlay/layers").iterdir())
    tmp_dirs = [p / "fs/tmp" for p in layer_dirs if (p / "fs/tmp").is_dir()]
    (tmp_dirs[0] / "planted").write_bytes(b"evil")
    os.chmod(tmp_dirs[-1], 0o777)
    found = verify_snapshots(root, ls.toc_or_none, ls.open)
    assert len(found) == 2, found
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []


def test_prune_drops_layers_without_blob_and_unused_ones(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    root = tmp_path / "snapshots"
    snap = OverlaySnapshotter(root / "overlay")
    chain = base_layers(ls)
    ensure_chain(snap, chain, ls.open, ls.toc)
    assert prune_snapshots(root, ls.store.has) == []
    ls.store.remove(chain[1])
    gone = prune_snapshots(root, ls.store.has)
    # the layer whose blob went, the chains through it, then the top layer no chain names
    assert len(list((root / "overlay/layers").iterdir())) == 1
    assert len(list((root / "overlay/committed").iterdir())) == 1
    assert sum("unused" in g for g in gone) == 1
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []


@pytest.mark.slow
@run_fixtures.needs_root
def test_cache_verify_repairs_a_snapshot_later_runs_would_use(
    bbhome: Path, tmp_path: Path
) -> None:
    body = "FROM busybox:test\nCOPY a.txt /tmp/\nRUN cat /tmp/a.txt > /seen\n"
    build(tmp_path / "ctx", bbhome, body, "--snapshotter", "overlay", files={"a.txt": "good\n"})
    copies = [p for p in (bbhome / "snapshots").rglob("a.txt") if p.parent.name == "tmp"]
    assert len(copies) == 1
    st = copies[0].stat()
    copies[0].write_text("evil\n")
    os.utime(copies[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    out = lbuild("cache", "verify", home=bbhome)
    assert "tmp/a.txt: content" in out.stdout + out.stderr
    assert copies[0].read_text() == "good\n"
    again = lbuild("cache", "verify", home=bbhome)
    assert "snapshot" not in again.stdout + again.stderr


@pytest.mark.slow
@run_fixtures.needs_root
def test_a_run_overlay_is_mounted_without_sync_at_unmount(
    bbhome: Path, tmp_path: Path
) -> None:
    # Without "volatile", unmounting the RUN's overlay syncs the whole file system of its
    # upperdir (other processes' dirty pages included); the RUN sees its root's options
    # (",volatile" on Linux 5.10-5.x, "fsync=volatile" later).
    body = (
        "FROM busybox:test\n"
        "RUN grep ' / / ' /proc/self/mountinfo > /root-mount\n"
        "RUN grep -qE ' overlay overlay .*(,|fsync=)volatile(,|$)' /root-mount\n"
    )
    built = build(
        tmp_path / "ctx", bbhome, body, "--snapshotter", "overlay", "--no-cache", check=False
    )
    assert built.proc.returncode == 0, built.proc.stderr
