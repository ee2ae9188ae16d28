"""ADD of local archives as Docker does it (issue 9 item 2, issue 11 item 14).

Docker decides "archive or not" by content (moby's ``IsArchivePath``: decompress by magic,
then the first tar header must read), never by name; extraction runs chrooted at the
destination (BuildKit's ``chrootarchive.Untar``), so a member path through a symlink an
earlier member made follows it inside the destination, and one through a file fails.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard
from util import lbuild, tree, umoci_unpack

from builder.plan.archive import archive_items, is_archive
from cache.errors import InvalidInput
from cache.types import Digest, Entry


def _tar(members: list[tuple[str, str, str]]) -> bytes:
    """A tar of (name, kind, payload): kind file (payload = content), dir, sym (payload = target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1000
            if kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, 0o750
                t.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
                t.addfile(ti)
            else:
                data = payload.encode()
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


TAR = _tar([("d", "dir", ""), ("d/a.txt", "file", "a")])


CASES = [
    ("plain.gz", gzip.compress(b"not a tar at all\n", mtime=0), False),
    ("x.tar.gz", gzip.compress(TAR, mtime=0), True),
    ("noext", TAR, True),
    ("data.bin", bz2.compress(TAR), True),
    ("data.xz", lzma.compress(TAR), True),
    ("data.zst", zstandard.ZstdCompressor().compress(TAR), True),
    ("text.tar", b"hello\n" * 200, False),
    ("broken.tgz", b"\x1f\x8b\x08" + b"\0" * 40, False),
    ("zeros.tar", bytes(2048), False),
]


# ids are the names: every xdist worker must collect the same test ids
@pytest.mark.parametrize("name, data, expected", CASES, ids=[c[0] for c in CASES])
def test_archive_by_content_not_name(tmp_path: Path, name: str, data: bytes, expected: bool) -> None:
    p = tmp_path / name
    p.write_bytes(data)
    assert is_archive(p) is expected


def _e(path: str, type_: str = "file", link: str = "") -> Entry:
    return Entry(path=path, type=type_, mode=0o644, link=link, offset=0)  # type: ignore[arg-type]


BLOB = Digest("sha256:" + "0" * 64)


def test_members_through_symlinks_resolve_inside_the_destination() -> None:
    toc = [
        _e(".", "dir"),
        _e("real", "dir"),
        _e("l", "symlink", "real"),
        _e("l/x"),
        _e("abs", "symlink", "/sub"),
        _e("abs/y"),
        _e("up", "symlink", "../../.."),
        _e("up/z"),
    ]
    got = dict(archive_items(toc, BLOB, "t.tar"))
    assert sorted(got) == ["abs", "l", "real", "real/x", "sub/y", "up", "z"]
    assert got["real/x"].path == "real/x" and got["real/x"].source is not None


def test_member_through_a_file_fails_naming_it() -> None:
    with pytest.raises(InvalidInput, match=r"ADD t.tar: archive entry 'f/x' goes through 'f'"):
        archive_items([_e("f"), _e("f/x")], BLOB, "t.tar", file="Dockerfile", line=3)


def test_a_later_file_replaces_a_directory_and_its_children() -> None:
    got = dict(archive_items([_e("d", "dir"), _e("d/a"), _e("d")], BLOB, "t.tar"))
    assert sorted(got) == ["d"] and got["d"].type == "file"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")
def test_add_archives_end_to_end(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "keep").mkdir(parents=True)
    (ctx / "keep" / "old.txt").write_text("old")
    (ctx / "plain.gz").write_bytes(gzip.compress(b"plain\n", mtime=0))
    (ctx / "noext").write_bytes(TAR)
    (ctx / "dot.tgz").write_bytes(
        gzip.compress(
            _tar([(".", "dir", ""), ("./d", "dir", ""), ("./d/b.txt", "file", "b")]), mtime=0
        )
    )
    (ctx / "sym.tar").write_bytes(
        _tar([("real", "dir", ""), ("l", "sym", "/real"), ("l/x", "file", "x")])
    )
    (ctx / "thru.tar").write_bytes(_tar([("f", "file", "f"), ("f/x", "file", "x")]))
    (ctx / "Dockerfile").write_text(
        "FROM scratch\n"
        "COPY keep /m/keep\n"
        "ADD plain.gz /p/\n"
        "ADD noext /n/\n"
        "ADD dot.tgz /m/\n"
        "ADD sym.tar /s/\n"
    )
    out = tmp_path / "out"
    lbuild("build", "-o", f"type=oci,dest={out}", ctx, home=home)
    t = tree(umoci_unpack(out, tmp_path / "u"))
    assert t["p/plain.gz"][0] == "file"  # copied as it is, not extracted
    assert t["n/d/a.txt"][0] == "file"  # a tar without an archive name is extracted
    assert t["m/keep/old.txt"][0] == "file" and t["m/d/b.txt"][0] == "file"  # merged
    assert t["m"] == ("dir", 0o755, 0, 0, None)  # "./" leaves the destination alone
    assert t["s/real/x"][0] == "file" and t["s/l"] == ("symlink", 0o777, 0, 0, "/real")
    assert "s/l/x" not in t
    (ctx / "Dockerfile").write_text("FROM scratch\nADD thru.tar /t/\n")
    p = lbuild("build", ctx, home=home, check=False)
    assert p.returncode == 2
    assert "Dockerfile:2: ADD thru.tar: archive entry 'f/x' goes through 'f'" in p.stderr


def test_add_checksum_on_a_local_source_is_refused(tmp_path: Path, home: Path) -> None:
    # BuildKit (dockerfile2llb dispatchCopy): --checksum needs one HTTP(S) or Git source; it
    # was silently ignored for local files.
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "Dockerfile").write_text("FROM scratch\nADD --checksum=sha256:00 a.txt /\n")
    p = lbuild("build", tmp_path, home=home, check=False)
    assert p.returncode == 2
    assert p.stderr.strip().endswith("Dockerfile:2: checksum requires HTTP(S) or Git sources")
