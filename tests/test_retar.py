"""cache.layers.retar: a layer written from the previous tar of its shape is byte for byte
the layer written from its sources, copies its unchanged members without reading their
sources, and never trusts a previous tar that does not match its diff_id."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.layers import retar
from cache.layers.tar import _RETAR_MIN, write_layer
from cache.layers.toc import dump_toc
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Entry, LayerInfo

GONE = "/nonexistent/lbuild-retar-test"  # a source that fails if anything reads it


def _file(path: str, data: bytes, mode: int = 0o644, mtime: int = 0, xattrs: bool = False) -> Entry:
    return Entry(
        path=path, type="file", mode=mode, size=len(data), digest=blake3(data).hexdigest(),
        mtime=mtime, xattrs=(("user.k", b"v" * 3),) if xattrs else (),
        source=ContentRef(data=data),
    )  # fmt: skip


def _layer(n_files: int, long_names: bool) -> list[Entry]:
    out = [Entry(path="app", type="dir", mode=0o755)]
    for d in range(4):
        out.append(Entry(path=f"app/d{d}", type="dir", mode=0o755))
    for i in range(n_files):
        # names of 80 to 130 bytes: on both sides of ustar's 100 (a PAX header beyond)
        name = f"app/d{i % 4}/f{i:03d}" + ("-" + "x" * (i % 50 + 65) if long_names and i % 3 == 0 else "")
        out.append(_file(name, os.urandom(i % 900), xattrs=i % 11 == 0))
    out.append(Entry(path="app/link", type="symlink", mode=0o777, link="d0/f000"))
    return out


def _record(store: BlobStore, shapes: Path, layer: LayerInfo) -> None:
    retar.remember(shapes, layer.toc, layer.diff_id, store.put(dump_toc(layer.toc)))


def _fresh(tmp: Path, entries: list[Entry]) -> LayerInfo:
    """The same entries written from their sources into a store of their own."""
    return write_layer(entries, BlobStore(tmp))


edit_st = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.sampled_from(["content", "grow", "shrink", "mode", "mtime", "dir-mtime"]),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(70, 160), long_names=st.booleans(), edits=edit_st)
def test_a_rewritten_layer_is_the_layer_written_from_its_sources(
    tmp_path_factory: object, n: int, long_names: bool, edits: list[tuple[int, str]]
) -> None:
    tmp = tmp_path_factory.mktemp("retar")  # type: ignore[attr-defined]
    store = BlobStore(tmp / "home")
    shapes = tmp / "home" / "tarshapes"
    v1 = _layer(n, long_names)
    first = write_layer(v1, store, shapes=shapes)
    _record(store, shapes, first)
    v2 = list(v1)
    changed: set[int] = set()
    for pick, how in edits:
        i = pick % len(v2)
        e = v2[i]
        if how == "dir-mtime":
            dirs = [k for k, x in enumerate(v2) if x.type == "dir"]
            i = dirs[pick % len(dirs)]
            v2[i] = dataclasses.replace(v2[i], mtime=v2[i].mtime + 7)
        elif e.type != "file":
            continue
        elif how in ("content", "grow", "shrink"):
            size = {"content": e.size, "grow": e.size + 700, "shrink": e.size // 3}[how]
            v2[i] = _file(e.path, os.urandom(size), e.mode, e.mtime, bool(e.xattrs))
        elif how == "mode":
            v2[i] = dataclasses.replace(e, mode=0o600)
        else:
            v2[i] = dataclasses.replace(e, mtime=e.mtime + 99)
        changed.add(i)
    # unchanged files' sources cannot be read: the rewrite must copy them from the old tar
    blind = [
        e if k in changed or e.type != "file" else dataclasses.replace(e, source=ContentRef(host_path=GONE))
        for k, e in enumerate(v2)
    ]  # fmt: skip
    same_files = sum(1 for k, e in enumerate(v2) if e.type == "file" and k not in changed)
    assert same_files > 0
    got = write_layer(blind, store, shapes=shapes)
    want = _fresh(tmp / "fresh", v2)
    assert (got.diff_id, got.size) == (want.diff_id, want.size)
    assert got.toc == want.toc
    with store.open(got.diff_id) as f, BlobStore(tmp / "fresh").open(want.diff_id) as g:
        assert f.read() == g.read()


def test_nothing_recorded_means_written_from_sources(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "home")
    entries = _layer(80, False)
    got = write_layer(entries, store, shapes=tmp_path / "home" / "tarshapes")
    assert got.diff_id == _fresh(tmp_path / "fresh", entries).diff_id
    assert retar.MIN_MEMBERS == _RETAR_MIN


def test_a_previous_tar_that_does_not_match_its_diff_id_is_not_used(tmp_path: Path) -> None:
    """A byte flipped in the previous tar: the layer is written from its sources (the right
    bytes), and the damaged blob leaves the store."""
    store = BlobStore(tmp_path / "home")
    shapes = tmp_path / "home" / "tarshapes"
    v1 = _layer(90, False)
    first = write_layer(v1, store, shapes=shapes)
    _record(store, shapes, first)
    path = store.path(first.diff_id)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside some file's bytes: the TOC still fits
    path.write_bytes(bytes(data))
    v2 = list(v1)
    v2[7] = _file(v1[7].path, b"edited\n")
    got = write_layer(v2, store, shapes=shapes)
    assert got.diff_id == _fresh(tmp_path / "fresh", v2).diff_id
    assert not store.has(first.diff_id)


def test_sweep_drops_records_whose_blobs_are_gone(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "home")
    shapes = tmp_path / "home" / "tarshapes"
    a = write_layer(_layer(70, False), store)
    _record(store, shapes, a)
    b = write_layer(_layer(75, True), store)
    _record(store, shapes, b)
    (shapes / "junk").write_text("not a record")
    store.remove(a.diff_id)
    assert retar.sweep(shapes, store.has) == 2
    assert sorted(os.listdir(shapes)) == [retar.shape_of(b.toc)]
