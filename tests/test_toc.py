"""TOC blobs (cache.layers.toc): a layer's TOC stored as JSON reads back exactly."""

from __future__ import annotations

import os
from pathlib import Path

from cache.layers.tar import read_toc, write_layer
from cache.layers.toc import dump_toc, load_toc
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Entry


def test_a_written_layers_toc_round_trips_through_json(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(5000))
    entries = [
        Entry(path="d", type="dir", mode=0o755, mtime=7),
        Entry(path="d/f", type="file", mode=0o4755, uid=1000, gid=50, size=5000, mtime=9,
              xattrs=(("user.note", b"\x00\xffbinary"),), source=ContentRef(host_path=str(src))),
        Entry(path="d/h", type="hardlink", link="d/f"),
        Entry(path="d/l", type="symlink", link="../élan/" + "x" * 120),
        Entry(path="dev", type="char", mode=0o600, devmajor=1, devminor=3),
        Entry(path="gone", type="whiteout"),
    ]  # fmt: skip
    store = BlobStore(tmp_path / "store")
    layer = write_layer(entries, store)
    assert load_toc(dump_toc(layer.toc)) == layer.toc
    with store.open(layer.diff_id) as f:
        assert load_toc(dump_toc(layer.toc)) == read_toc(f)  # what reading the tar gives
    assert dump_toc(load_toc(dump_toc(layer.toc)) or ()) == dump_toc(layer.toc)


def test_other_formats_are_not_taken_for_a_toc() -> None:
    assert load_toc(b"not json") is None
    assert load_toc(b'{"toc": 99, "entries": []}') is None
    assert load_toc(b"[1, 2]") is None
    assert load_toc(dump_toc(())) == ()


def test_a_damaged_toc_blob_reads_as_none() -> None:
    good = dump_toc([Entry(path="a", type="file", size=1, digest="0" * 64, offset=512)])
    assert load_toc(good) is not None
    assert load_toc(good.replace(b'"entries":[[', b'"entries":[["x"],[')) is None  # short row
    assert load_toc(b'{"toc": 1, "entries": 5}') is None
    assert load_toc(b'{"toc": 1}') is None


def test_a_toc_row_no_layer_could_have_reads_as_none() -> None:
    """A TOC blob named by a shared cache's record is input: rows that would fail later in a
    file system call (a traceback) make the whole blob unusable (the tar is read instead)."""
    import json

    row = ["a", "file", 0o644, 0, 0, 1, "0" * 64, "", 0, 512]
    assert load_toc(json.dumps({"toc": 1, "entries": [row]}).encode()) is not None
    bad = {
        "owner as text": {3: "0"},
        "owner beyond uid_t": {3: 1 << 40},
        "negative group": {4: -1},
        "time beyond time_t": {8: 1 << 63},
        "a float size": {5: 1.5},
        "negative size": {5: -1},
        "mode with type bits": {2: 0o100644},
        "a path going up": {0: "../etc/passwd"},
        "an absolute path": {0: "/etc/passwd"},
        "a NUL in the path": {0: "a\u0000b"},
        "a NUL in the link": {7: "x\u0000"},
        "an unknown kind": {1: "socket"},
        "a number as the path": {0: 5},
        "a hardlink to a host path": {1: "hardlink", 7: "/etc/passwd"},
        "a hardlink going up": {1: "hardlink", 7: "a/../../etc/passwd"},
        "a hardlink to nothing": {1: "hardlink", 7: ""},
    }
    for what, change in bad.items():
        broken = list(row)
        for i, v in change.items():
            broken[i] = v
        assert load_toc(json.dumps({"toc": 1, "entries": [row, broken]}).encode()) is None, what
    link = list(row)
    link[0], link[1], link[7] = "b", "hardlink", "a"  # a hardlink inside the layer is fine
    assert load_toc(json.dumps({"toc": 1, "entries": [row, link]}).encode()) is not None


def test_a_toc_dumped_again_is_the_same_bytes_without_encoding_it_again() -> None:
    """The layer's TOC blob (its COPY) and its directory's toc.json (the RUN above) are one
    encoding: the same tuple gets the bytes it got; another tuple is encoded anew."""
    from cache.layers.toc import _dump, dump_toc

    toc = tuple(Entry(path=f"d/f{i}", type="file", size=i, digest="0" * 64, offset=512 * i)
                for i in range(50))
    first = dump_toc(toc)
    assert dump_toc(toc) is first and first == _dump(toc)
    twin = (*toc[:49], toc[49])
    assert twin is not toc and dump_toc(twin) == first and dump_toc(twin) is not first
    changed = (*toc[:49], Entry(path="d/f49", type="file", size=1, digest="1" * 64))
    assert load_toc(dump_toc(changed)) == tuple(
        e if e.path != "d/f49" else changed[49] for e in toc
    )


def test_a_layer_toc_kept_in_the_home_is_found_and_checked(tmp_path: Path) -> None:
    from cache.layers.toc import layer_toc, remember_layer_toc
    from cache.types import sha256_digest

    src = tmp_path / "f"
    src.write_bytes(b"x" * 3000)
    store = BlobStore(tmp_path / "home")
    layer = write_layer(
        [Entry(path="f", type="file", mode=0o644, size=3000, source=ContentRef(host_path=str(src)))],
        store,
    )
    assert layer_toc(store, layer.diff_id) is None  # none kept yet
    blob = remember_layer_toc(store, layer.diff_id, layer.toc)
    record = tmp_path / "home" / "tocs" / layer.diff_id.removeprefix("sha256:")
    assert record.read_text() == f"{layer.diff_id} {blob}"
    assert load_toc(store.read(blob)) == layer.toc
    assert layer_toc(store, layer.diff_id) == layer.toc
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no part file left
    # a record naming a blob that is not there, not a digest, another layer, or bytes that
    # are not the blob's own
    for text in (
        f"{layer.diff_id} {sha256_digest('0' * 64)}",
        f"{layer.diff_id} sha256:not-hex",
        f"{sha256_digest('1' * 64)} {blob}",
        blob,
    ):
        record.write_text(text)
        assert layer_toc(store, layer.diff_id) is None, text
    stored = store.path(blob)
    os.chmod(stored, 0o644)
    stored.write_bytes(dump_toc(()))
    record.write_text(f"{layer.diff_id} {blob}")
    assert layer_toc(store, layer.diff_id) is None


def test_a_prune_sweeps_the_layer_toc_records_whose_blobs_are_gone(tmp_path: Path) -> None:
    """``cache prune``'s sweep of shape records takes the TOC records too: a record whose
    TOC blob (or layer) went with a prune is removed, the others stay."""
    from cache.layers.retar import sweep
    from cache.layers.toc import remember_layer_toc

    store = BlobStore(tmp_path / "home")
    kept, gone = (
        write_layer([Entry(path=name, type="dir", mode=0o755)], store) for name in ("a", "b")
    )
    remember_layer_toc(store, kept.diff_id, kept.toc)
    blob = remember_layer_toc(store, gone.diff_id, gone.toc)
    store.path(blob).unlink()
    records = tmp_path / "home" / "tocs"
    assert sweep(records, store.has) == 1
    assert [p.name for p in records.iterdir()] == [kept.diff_id.removeprefix("sha256:")]
