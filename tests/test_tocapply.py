"""Extracting a layer from its table of contents (cache.layers.tocapply) makes the tree the
tar applier makes, and refuses bytes that do not match the TOC."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cache.errors import DigestMismatch
from cache.layers.apply import apply_layer
from cache.layers.tar import write_layer
from cache.layers.tocapply import apply_toc, toc_extractable
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Entry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="devices and owners need root")
T = 1_600_000_000


def _f(path: str, data: bytes, **kw: object) -> Entry:
    return Entry(path=path, type="file", size=len(data), mtime=T, source=ContentRef(data=data), **kw)  # type: ignore[arg-type]


ENTRIES = [
    Entry(path="etc", type="dir", mode=0o755, mtime=T - 5),
    _f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    _f("etc/shadow", b"secret\n", mode=0o600, uid=0, gid=42),
    Entry(path="etc/hard", type="hardlink", link="etc/passwd", mtime=T),
    Entry(path="tmp", type="dir", mode=0o1777, mtime=T - 7),
    Entry(path="tmp/fifo", type="fifo", mode=0o644, mtime=T),
    Entry(path="usr/bin/tool", type="symlink", link="../../etc/passwd", mode=0o777, mtime=T),
    _f("usr/bin/x", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000, xattrs=(("user.n", b"\xff"),)),
    Entry(path="gone", type="whiteout", mode=0),
    Entry(path="var", type="dir", mode=0o750, uid=5, gid=6, mtime=T - 9),
    Entry(path="var", type="opaque", mode=0),
    _f("var/new", b"new"),
    Entry(path="dev-null", type="char", mode=0o666, devmajor=1, devminor=3, mtime=T),
    # files made in a setgid directory get its group unless given theirs; a mode with
    # bits the umask takes away
    Entry(path="srv", type="dir", mode=0o2775, gid=50, mtime=T - 3),
    _f("srv/f", b"f\n", mode=0o664),
    _f("srv/g", b"g\n", mode=0o2777, gid=50),
]


def _tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            data: object = None
            if stat.S_ISREG(st.st_mode):
                data = Path(p).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            xattrs = sorted(
                (k, os.getxattr(p, k, follow_symlinks=False))
                for k in os.listxattr(p, follow_symlinks=False)
            )
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # made now, both ways
            out[os.path.relpath(p, root)] = (
                st.st_mode, st.st_uid, st.st_gid, None if whiteout else st.st_mtime_ns,
                st.st_rdev, st.st_nlink,
                data, xattrs,
            )  # fmt: skip
    return out


@pytest.mark.parametrize("overlay", [True, False])
def test_same_tree_as_the_tar_applier(tmp_path: Path, overlay: bool) -> None:
    store = BlobStore(tmp_path / "blobs")
    info = write_layer(ENTRIES, store)
    assert toc_extractable(info.toc)
    parents = {"usr": Entry(path="usr", type="dir", mode=0o700, uid=3, gid=4, mtime=T - 1)}
    a, b = tmp_path / "tar", tmp_path / "toc"
    for d in (a, b):
        if not overlay:  # a merged tree: what the layers below left
            (d / "var/old").mkdir(parents=True)
            (d / "gone").write_text("x")
    with store.open(info.diff_id) as f:
        apply_layer(f, a, expected=info.diff_id, overlay=overlay, parents=parents)
    with store.open(info.diff_id) as f:
        apply_toc(f, info.toc, b, overlay=overlay, parents=parents)
    ta, tb = _tree(a), _tree(b)
    assert ta == tb
    assert "var/old" not in ta and ("gone" in ta) == overlay


def test_a_changed_byte_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    info = write_layer(ENTRIES, store)
    blob = tmp_path / "copy.tar"
    data = bytearray(store.read(info.diff_id))
    shadow = next(e for e in info.toc if e.path == "etc/shadow")
    assert shadow.type == "file" and shadow.offset > 0
    data[shadow.offset] ^= 1
    blob.write_bytes(bytes(data))
    with open(blob, "rb") as f, pytest.raises(DigestMismatch, match="etc/shadow"):
        apply_toc(f, info.toc, tmp_path / "out", overlay=True)


@pytest.mark.parametrize("link", ["/etc/hostname", "etc/../../../etc/hostname", ""])
def test_a_hardlink_out_of_the_layer_is_refused(tmp_path: Path, link: str) -> None:
    """A TOC is input (a shared cache names TOC blobs): a hardlink whose target is not a path
    inside the layer is refused, never a link to a file of the host in a layer directory."""
    from cache.errors import InvalidInput

    store = BlobStore(tmp_path / "blobs")
    info = write_layer([Entry(path="etc", type="dir", mode=0o755), _f("etc/a", b"a\n")], store)
    good = (*info.toc, Entry(path="etc/b", type="hardlink", link="etc/a"))
    bad = (*info.toc, Entry(path="etc/b", type="hardlink", link=link))
    with store.open(info.diff_id) as f:
        apply_toc(f, good, tmp_path / "good", overlay=True)
    assert os.path.samefile(tmp_path / "good/etc/a", tmp_path / "good/etc/b")
    with store.open(info.diff_id) as f, pytest.raises(InvalidInput, match="bad target"):
        apply_toc(f, bad, tmp_path / "bad", overlay=True)
    assert not os.path.lexists(tmp_path / "bad/etc/b")
