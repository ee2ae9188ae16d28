"""Tests for cache.layers.tar: deterministic layer tars checked with Python's tarfile and GNU tar."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import random
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import zstandard
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.errors import InvalidInput, LbuildError, StoreError, Unsupported
from cache.layers.tar import (
    compress_layer,
    import_layer,
    open_member,
    read_toc,
    write_layer,
)
from cache.store.blobs import BlobStore
from cache.types import MEDIA_TYPES, ContentRef, Entry, LayerInfo

REPO = Path(__file__).resolve().parents[1]
LONG = "d" * 60 + "/" + "e" * 70 + "/" + "f" * 40  # 172 characters
UNI = "données/ファイル.txt"


def host_entries(root: Path, mtime: int = 1_700_000_000) -> list[Entry]:
    """A varied tree on disk, described as entries with a caller-chosen mtime."""
    (root / "bin").mkdir(parents=True)
    (root / "données").mkdir()
    (root / "empty").mkdir()
    (root / LONG).parent.mkdir(parents=True)
    files = {
        "bin/tool": b"#!/bin/sh\necho hi\n",
        UNI: "unicode content ✓\n".encode(),
        LONG: b"long path content\n" * 10,
        "big": os.urandom(3 * 1024 * 1024 + 17),
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    entries = [
        Entry("bin", "dir", 0o755, mtime=mtime),
        Entry("données", "dir", 0o750, uid=1000, gid=1000, mtime=mtime),
        Entry("empty", "dir", 0o700, mtime=mtime),
        Entry("d" * 60, "dir", 0o755, mtime=mtime),
        Entry("d" * 60 + "/" + "e" * 70, "dir", 0o755, mtime=mtime),
        Entry("bin/sh-link", "symlink", 0o777, link="/bin/busybox", mtime=mtime),
        Entry("bin/tool-hard", "hardlink", 0o4755, link="bin/tool", mtime=mtime),
    ]
    modes = {"bin/tool": 0o4755, UNI: 0o640, LONG: 0o644, "big": 0o600}
    for rel, data in files.items():
        xattrs = (("user.origin", b"lbuild\x00\xff"),) if rel == "bin/tool" else ()
        entries.append(
            Entry(
                rel,
                "file",
                modes[rel],
                uid=1000 if rel == UNI else 0,
                gid=1000 if rel == UNI else 0,
                size=len(data),
                mtime=mtime,
                xattrs=xattrs,
                source=ContentRef(host_path=str(root / rel)),
            )
        )
    return entries


def members(store: BlobStore, info: LayerInfo) -> list[tarfile.TarInfo]:
    with tarfile.open(store.path(info.diff_id)) as t:
        return t.getmembers()


def test_same_entries_from_different_dirs_give_same_bytes(tmp_path: Path) -> None:
    a = host_entries(tmp_path / "a")
    time.sleep(0.01)
    b = host_entries(tmp_path / "b")
    # different host mtimes and inodes must not matter: the caller decides mtime
    for e in b:
        if e.source is not None and e.source.host_path:
            os.utime(e.source.host_path, (12345, 12345))
    # random content of "big" differs between a and b; make it equal for this test
    big = next(e for e in a if e.path == "big")
    assert big.source is not None and big.source.host_path is not None
    (tmp_path / "b" / "big").write_bytes(Path(big.source.host_path).read_bytes())
    s1, s2 = BlobStore(tmp_path / "s1"), BlobStore(tmp_path / "s2")
    i1, i2 = write_layer(a, s1), write_layer(b, s2)
    assert i1.diff_id == i2.diff_id
    assert s1.read(i1.diff_id) == s2.read(i2.diff_id)
    assert i1.toc == i2.toc


def test_order_independence(tmp_path: Path) -> None:
    entries = host_entries(tmp_path / "src")
    store = BlobStore(tmp_path / "s")
    first = write_layer(entries, store)
    rng = random.Random(7)
    for _ in range(3):
        shuffled = entries[:]
        rng.shuffle(shuffled)
        assert write_layer(shuffled, store).diff_id == first.diff_id


def test_tar_order_and_whiteouts(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    entries = [
        Entry("a/z", "file", size=0),
        Entry("a/b", "dir", 0o755),
        Entry("a/b/c", "file", size=1, source=ContentRef(data=b"c")),
        Entry("a", "dir", 0o755),
        Entry("a/old", "whiteout"),
        Entry("a/b", "opaque"),
        Entry("a/b", "whiteout"),  # deleted and recreated as a directory in one layer
        Entry("a b", "file", size=0),
        Entry("top-gone", "whiteout"),
    ]
    info = write_layer(entries, store)
    names = [m.name for m in members(store, info)]
    assert names == [
        ".wh.top-gone",  # whiteouts first within their directory, the root included
        "a",
        "a/.wh.b",
        "a/.wh.old",
        "a/b",
        "a/b/.wh..wh..opq",
        "a/b/c",
        "a/z",
        "a b",
    ]
    raw = store.read(info.diff_id)
    assert raw[512 : 512 + 3] == b"a/\0"  # dirs carry a trailing slash
    assert raw[512 + 100 : 512 + 108] == b"0000755\0"
    wh = next(m for m in members(store, info) if m.name == "a/.wh.old")
    assert wh.isreg() and wh.mode == 0 and wh.size == 0
    assert [(e.path, e.type) for e in info.toc][1:6] == [
        ("a", "dir"),
        ("a/b", "whiteout"),
        ("a/old", "whiteout"),
        ("a/b", "dir"),
        ("a/b", "opaque"),
    ]


def test_headers_are_deterministic_ustar(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    info = write_layer(
        [Entry("f", "file", 0o644, uid=5, gid=6, size=2, mtime=99, source=ContentRef(data=b"hi"))],
        store,
    )
    raw = store.read(info.diff_id)
    assert len(raw) == 512 + 512 + 1024  # header, data block, two zero blocks: no PAX
    hdr = raw[:512]
    assert hdr[:2] == b"f\0"
    assert hdr[257:265] == b"ustar\x0000"
    assert hdr[265:329] == bytes(64)  # empty uname/gname
    assert hdr[136:148] == b"%011o\0" % 99
    assert hdr[108:124] == b"0000005\x000000006\x00"
    assert raw[512:514] == b"hi" and info.toc[0].offset == 512
    assert info.toc[0].digest == blake3(b"hi").hexdigest()


def test_special_entries_extract_with_gnu_tar(tmp_path: Path) -> None:
    entries = host_entries(tmp_path / "src")
    entries += [
        Entry("dev", "dir", 0o755),
        Entry("dev/null", "char", 0o666, devmajor=1, devminor=3),
        Entry("dev/loop0", "block", 0o660, gid=6, devmajor=7, devminor=0),
        Entry("dev/fifo", "fifo", 0o644),
        Entry("sticky", "dir", 0o1777),
        Entry("bigid", "file", 0o644, uid=3_000_000, gid=4_000_000, size=0),
    ]
    store = BlobStore(tmp_path / "s")
    info = write_layer(entries, store)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", store.path(info.diff_id)],
        cwd=out,
        check=True,
    )
    st = os.lstat(out / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert os.lstat(out / "bin/tool-hard").st_ino == st.st_ino
    assert os.getxattr(out / "bin/tool", "user.origin") == b"lbuild\x00\xff"
    assert os.readlink(out / "bin/sh-link") == "/bin/busybox"
    assert (out / LONG).read_bytes() == b"long path content\n" * 10
    assert (out / UNI).read_text() == "unicode content ✓\n"
    uni = os.lstat(out / UNI)
    assert (uni.st_uid, uni.st_gid, stat.S_IMODE(uni.st_mode)) == (1000, 1000, 0o640)
    assert (out / "empty").is_dir() and list((out / "empty").iterdir()) == []
    assert stat.S_IMODE(os.lstat(out / "sticky").st_mode) == 0o1777
    big = os.lstat(out / "bigid")
    assert (big.st_uid, big.st_gid) == (3_000_000, 4_000_000)
    null = os.lstat(out / "dev/null")
    assert (
        stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    )
    assert stat.S_ISBLK(os.lstat(out / "dev/loop0").st_mode)
    assert stat.S_ISFIFO(os.lstat(out / "dev/fifo").st_mode)
    assert os.lstat(out / "bin/tool").st_mtime == 1_700_000_000


def test_read_toc_round_trip(tmp_path: Path) -> None:
    entries = [
        *host_entries(tmp_path / "src"),
        Entry("gone", "whiteout", mtime=3),
        Entry("données", "opaque", mtime=3),
        Entry("dev", "dir", 0o755),
        Entry("dev/null", "char", 0o666, devmajor=1, devminor=3),
        Entry("bigid", "file", 0o644, uid=3_000_000, size=0, mtime=2**34),
    ]
    store = BlobStore(tmp_path / "s")
    info = write_layer(entries, store)
    with store.open(info.diff_id) as f:
        toc = read_toc(f)
    assert toc == info.toc
    by_path = {(e.path, e.type): e for e in toc}
    tool = by_path[("bin/tool", "file")]
    assert tool.digest == blake3(b"#!/bin/sh\necho hi\n").hexdigest()
    assert tool.xattrs == (("user.origin", b"lbuild\x00\xff"),)
    assert by_path[("bin/tool-hard", "hardlink")].link == "bin/tool"
    # offsets serve random reads
    for e in toc:
        if e.type == "file":
            with open_member(store, info.diff_id, e) as m:
                data = m.read()
            assert len(data) == e.size and blake3(data).hexdigest() == e.digest


def test_read_toc_of_a_foreign_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/.wh.passwd").write_bytes(b"")
    (src / "etc/.wh..wh..opq").write_bytes(b"")
    (src / ("x" * 150)).write_bytes(b"gnu long name")
    tar = tmp_path / "l.tar"
    subprocess.run(
        ["tar", "--format=gnu", "--sort=name", "-cf", tar, "./etc", "./" + "x" * 150],
        cwd=src,
        check=True,
    )
    with open(tar, "rb") as f:
        toc = read_toc(f)
    kinds = {(e.path, e.type) for e in toc}
    assert ("etc", "dir") in kinds
    assert ("etc/passwd", "whiteout") in kinds
    assert ("etc", "opaque") in kinds
    long_file = next(e for e in toc if e.path == "x" * 150)
    with open(tar, "rb") as f:
        f.seek(long_file.offset)
        assert f.read(long_file.size) == b"gnu long name"


def test_read_toc_rejects_bad_tars(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("../evil")
        t.addfile(ti, io.BytesIO(b""))
    with pytest.raises(InvalidInput, match="unsafe path"):
        read_toc(io.BytesIO(buf.getvalue()))
    corrupt = bytearray(buf.getvalue())
    corrupt[0] = ord("X")
    with pytest.raises(InvalidInput, match="checksum"):
        read_toc(io.BytesIO(bytes(corrupt)))
    with pytest.raises(InvalidInput, match="truncated"):
        good = io.BytesIO()
        with tarfile.open(fileobj=good, mode="w") as t:
            ti = tarfile.TarInfo("f")
            ti.size = 2000
            t.addfile(ti, io.BytesIO(b"x" * 2000))
        read_toc(io.BytesIO(good.getvalue()[:1024]))


def test_hardlink_before_its_target_is_reordered(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    entries = [
        Entry("z/data", "file", 0o755, size=4, source=ContentRef(data=b"data")),
        Entry("a-link", "hardlink", link="z/data"),
        Entry("m-link", "hardlink", link="a-link"),  # chains resolve to the file
        Entry("z", "dir", 0o755),
    ]
    info = write_layer(entries, store)
    ms = {m.name: m for m in members(store, info)}
    assert ms["a-link"].isreg() and ms["a-link"].size == 4 and ms["a-link"].mode == 0o755
    assert ms["m-link"].islnk() and ms["m-link"].linkname == "a-link"
    assert ms["z/data"].islnk() and ms["z/data"].linkname == "a-link"


def test_content_changed_while_reading(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    ref = ContentRef(host_path=str(f))
    for size in (4, 6):
        with pytest.raises(LbuildError, match="file changed while being read"):
            write_layer([Entry("f", "file", size=size, source=ref)], store)
    with pytest.raises(LbuildError, match="file changed"):
        write_layer([Entry("f", "file", size=5, digest="0" * 64, source=ref)], store)
    ok = write_layer([Entry("f", "file", size=5, source=ref)], store)
    assert ok.toc[0].digest == blake3(b"12345").hexdigest()
    assert list((tmp_path / "tmp").iterdir()) == []  # failed layers left nothing behind


def _reference_order(e: Entry) -> tuple[tuple[int, str], ...]:
    """Tar order as the layer format defines it: path components tagged 2, a directory's
    opaque marker (0, "") first, then its whiteouts (1, name)."""
    comps = () if e.path == "." else tuple(e.path.split("/"))
    if e.type == "opaque":
        return (*((2, c) for c in comps), (0, ""))
    if e.type == "whiteout":
        return (*((2, c) for c in comps[:-1]), (1, comps[-1]))
    return tuple((2, c) for c in comps)


_COMPONENT = st.sampled_from(["a", "b", "a b", "\x01", "\x01a", " ", "é", "~", "A", "a.b", "ab"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(_COMPONENT, min_size=1, max_size=3),
            st.sampled_from(["file", "dir", "whiteout", "opaque", "symlink"]),
        ),
        max_size=12,
    )
)
def test_member_order_follows_the_format(
    tmp_path_factory: pytest.TempPathFactory, raw: list[tuple[list[str], str]]
) -> None:
    entries: dict[tuple[str, bool], Entry] = {}
    for comps, kind in raw:
        path = "/".join(comps)
        link = "t" if kind == "symlink" else ""
        key = (path, kind in ("whiteout", "opaque"))
        entries.setdefault(key, Entry(path, kind, link=link))  # type: ignore[arg-type]
    store = BlobStore(tmp_path_factory.mktemp("order"))
    info = write_layer(list(entries.values()), store)
    assert list(info.toc) == sorted(info.toc, key=_reference_order)
    assert len(info.toc) == len(entries)


def test_content_from_many_blobs_large_and_small(tmp_path: Path) -> None:
    """Files copied from more layer blobs than the writer keeps open, some bigger than its
    read buffer, give the layer their inline bytes would."""
    store = BlobStore(tmp_path)
    rng = random.Random(5)
    datas = [rng.randbytes(n) for n in [1, 0, 600, (1 << 20) + 3, 3 << 20] + [100] * 20]
    copies, inline = [], []
    for i, data in enumerate(datas):
        lower = write_layer(
            [Entry("f", "file", size=len(data), source=ContentRef(data=data))], store
        )
        src = ContentRef(blob=lower.diff_id, offset=lower.toc[0].offset)
        copies.append(Entry(f"d/{i:02d}", "file", size=len(data), source=src))
        inline.append(Entry(f"d/{i:02d}", "file", size=len(data), source=ContentRef(data=data)))
    rng.shuffle(copies)
    info = write_layer(copies, store)
    assert info == write_layer(inline, store)
    for e in info.toc:
        with open_member(store, info.diff_id, e) as m:
            assert m.read() == datas[int(e.path[2:])]
    short = dataclasses.replace(copies[0], size=copies[0].size + 5000)
    with pytest.raises(StoreError, match="ends before"):
        write_layer([short], store)


def test_content_from_a_stored_layer_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = write_layer(
        [Entry("f", "file", size=7, source=ContentRef(data=b"payload"))], store
    ).toc[0]
    lower = write_layer([Entry("f", "file", size=7, source=ContentRef(data=b"payload"))], store)
    copy = Entry(
        "copied",
        "file",
        size=first.size,
        source=ContentRef(blob=lower.diff_id, offset=first.offset),
    )
    info = write_layer([copy], store)
    with open_member(store, info.diff_id, info.toc[0]) as m:
        assert m.read() == b"payload"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Entry("/abs", "file"), "invalid path"),
        (Entry("a/../b", "file"), "invalid path"),
        (Entry("a/", "file"), "invalid path"),
        (Entry("x/.wh.y", "file"), "reserved for whiteouts"),
        (Entry("f", "file", mode=0o100644), "bits beyond"),
        (Entry("s", "symlink"), "symlink without"),
        (Entry("f", "file", size=3), "no content source"),
        (Entry("f", "file", size=3, source=ContentRef(data=b"ab")), "inline data"),
        (Entry(".", "file"), "root of a layer"),
        (Entry("f", "file", xattrs=(("a=b", b""),)), "xattr"),
    ],
)
def test_invalid_entries(tmp_path: Path, entry: Entry, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        write_layer([entry], BlobStore(tmp_path))


def test_duplicate_entries_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="duplicate"):
        write_layer([Entry("a", "dir"), Entry("a", "dir", 0o700)], BlobStore(tmp_path))


def test_compress_is_deterministic_and_imports_back(tmp_path: Path) -> None:
    entries = host_entries(tmp_path / "src")
    store = BlobStore(tmp_path / "s")
    info = write_layer(entries, store)
    raw = store.read(info.diff_id)
    for codec in ("gzip", "zstd"):
        b1 = compress_layer(store, info.diff_id, codec)
        b2 = compress_layer(store, info.diff_id, codec)
        assert b1 == b2 and b1.media_type == MEDIA_TYPES[codec]
        blob = store.read(b1.digest)
        assert len(blob) == b1.size < len(raw)
        if codec == "gzip":
            assert blob[3] == 0  # no FNAME flag
            assert blob[4:8] == bytes(4)  # mtime 0
            assert blob[9] == 255  # fixed OS byte
            assert gzip.decompress(blob) == raw
        else:
            assert zstandard.ZstdDecompressor().decompress(blob) == raw
        with store.open(b1.digest) as f:
            back = import_layer(store, f, b1.media_type)
        assert back == info
    assert compress_layer(store, info.diff_id, "gzip", 1) != compress_layer(
        store, info.diff_id, "gzip", 3
    )
    none = compress_layer(store, info.diff_id, "none")
    assert none.digest == info.diff_id and none.size == len(raw)


def test_import_keeps_every_byte_of_foreign_tars(tmp_path: Path) -> None:
    # tarfile pads archives to 10240-byte records: the diff_id must cover the padding too
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("hello.txt")
        ti.size = 5
        t.addfile(ti, io.BytesIO(b"hello"))
    raw = buf.getvalue()
    store = BlobStore(tmp_path)
    info = import_layer(
        store, io.BytesIO(gzip.compress(raw)), "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
    assert store.read(info.diff_id) == raw and info.size == len(raw)
    assert [(e.path, e.size) for e in info.toc] == [("hello.txt", 5)]
    with pytest.raises(InvalidInput, match="gzip"):
        import_layer(store, io.BytesIO(b"not gzip at all"), MEDIA_TYPES["gzip"])
    with pytest.raises(Unsupported):
        import_layer(store, io.BytesIO(raw), "application/x-foo")


_SPARSE = """
import os, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cache.store.blobs import BlobStore
from cache.layers.tar import write_layer, read_toc
from cache.types import ContentRef, Entry
big = Path(sys.argv[2]) / "sparse"
with open(big, "wb") as f:
    f.truncate(1 << 30)
store = BlobStore(Path(sys.argv[2]) / "store")
info = write_layer([Entry("sparse", "file", size=1 << 30, source=ContentRef(host_path=str(big)))], store)
with store.open(info.diff_id) as f:
    toc = read_toc(f)
assert toc == info.toc
print(info.size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_one_gib_sparse_file_streams_in_constant_memory(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SPARSE, str(REPO), str(tmp_path)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split()
    size, max_rss_kib = int(out[0]), int(out[1])
    assert size == 512 + (1 << 30) + 1024
    # well below the 1 GiB that slurping would need: alone it peaks near 40 MiB, but one
    # run under the whole suite on 2 cores peaked at 293 MiB (cause not found), so the bound
    # only proves streaming, not a number
    assert max_rss_kib < 512 * 1024


def test_import_auto_detects_archive_compression(tmp_path: Path) -> None:
    import bz2
    import lzma

    store = BlobStore(tmp_path)
    info = write_layer([Entry("x", "file", size=3, source=ContentRef(data=b"abc"))], store)
    raw = store.read(info.diff_id)
    forms = {
        "gzip": gzip.compress(raw),
        "zstd": zstandard.ZstdCompressor().compress(raw),
        "bzip2": bz2.compress(raw),
        "xz": lzma.compress(raw),
        "none": raw,
    }
    for name, blob in forms.items():
        back = import_layer(store, io.BytesIO(blob), "auto")
        assert back == info, name
    with pytest.raises(InvalidInput):
        import_layer(store, io.BytesIO(b"just some text, not an archive" * 40), "auto")
