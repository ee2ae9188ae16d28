"""Tests for cache/unpack.py: extracting layer tars onto merged trees and overlay lowerdirs."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from cache.errors import DigestMismatch, InvalidInput
from cache.layers.apply import apply_layer, normalize_member_path
from cache.types import Digest

Member = tuple[tarfile.TarInfo, bytes | None]


def member(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes | None = None,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_600_000_000,
    link: str = "",
    dev: tuple[int, int] = (0, 0),
    xattrs: dict[str, str] | None = None,
) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.mtime = mtime
    ti.linkname = link
    ti.devmajor, ti.devminor = dev
    if data is not None:
        ti.size = len(data)
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return ti, data


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def digest_of(b: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(b).hexdigest())


def apply(tar: bytes, dest: Path, **kw: object) -> Digest:
    return apply_layer(io.BytesIO(tar), dest, **kw)  # type: ignore[arg-type]


D = tarfile.DIRTYPE


def test_files_dirs_links_and_metadata(tmp_path: Path) -> None:
    tar = make_tar(
        [
            member("bin/", D, mode=0o755, mtime=1_500_000_000),
            member("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001),
            member("bin/sh", tarfile.SYMTYPE, link="tool", mtime=1_400_000_000),
            member("bin/tool2", tarfile.LNKTYPE, link="bin/tool"),
            member("dev/", D, mode=0o755),
            member("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
            member("dev/fifo", tarfile.FIFOTYPE, mode=0o600),
            member("etc/conf", data=b"x", xattrs={"user.tag": "v1"}),
            member("./var/lib/deep", data=b"deep"),
        ]
    )
    dest = tmp_path / "root"
    got = apply(tar, dest, expected=digest_of(tar))
    assert got == digest_of(tar)
    st = os.lstat(dest / "bin/tool")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid) == (1000, 1001)
    assert st.st_mtime == 1_600_000_000
    assert os.readlink(dest / "bin/sh") == "tool"
    assert os.lstat(dest / "bin/sh").st_mtime == 1_400_000_000
    assert os.lstat(dest / "bin/tool2").st_ino == st.st_ino
    # Directory times are set after their children were made.
    assert os.lstat(dest / "bin").st_mtime == 1_500_000_000
    dev = os.lstat(dest / "dev/null")
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert stat.S_ISFIFO(os.lstat(dest / "dev/fifo").st_mode)
    assert os.getxattr(dest / "etc/conf", "user.tag") == b"v1"
    assert (dest / "var/lib/deep").read_bytes() == b"deep"


def test_digest_mismatch_names_the_layer(tmp_path: Path) -> None:
    tar = make_tar([member("a", data=b"a")])
    wrong = digest_of(b"something else")
    with pytest.raises(DigestMismatch) as err:
        apply(tar, tmp_path / "root", expected=wrong, name="layer sha256:feed")
    assert "layer sha256:feed" in str(err.value)
    assert err.value.actual == digest_of(tar)


def test_whiteouts_on_a_merged_tree(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    apply(
        make_tar(
            [
                member("keep", data=b"k"),
                member("gone", data=b"g"),
                member("dir/", D),
                member("dir/sub/", D),
                member("dir/sub/x", data=b"x"),
                member("opq/", D),
                member("opq/old", data=b"old"),
            ]
        ),
        dest,
    )
    apply(
        make_tar(
            [
                member(".wh.gone"),
                member(".wh.dir"),
                member("opq/", D),
                member("opq/.wh..wh..opq"),
                member("opq/new", data=b"new"),
                member(".wh.never-existed"),
            ]
        ),
        dest,
    )
    assert sorted(os.listdir(dest)) == ["keep", "opq"]
    assert os.listdir(dest / "opq") == ["new"]


def test_opaque_marker_after_siblings_keeps_them(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    apply(make_tar([member("d/", D), member("d/old", data=b"o")]), dest)
    apply(make_tar([member("d/", D), member("d/new", data=b"n"), member("d/.wh..wh..opq")]), dest)
    assert os.listdir(dest / "d") == ["new"]


def test_overlay_whiteouts(tmp_path: Path) -> None:
    dest = tmp_path / "lower"
    apply(
        make_tar(
            [
                member(".wh.gone"),
                member("opq/", D),
                member("opq/.wh..wh..opq"),
                member("opq/f", data=b"f"),
            ]
        ),
        dest,
        overlay=True,
    )
    st = os.lstat(dest / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(dest / "opq", "trusted.overlay.opaque") == b"y"
    assert (dest / "opq/f").read_bytes() == b"f"


def test_type_changes_replace_the_old_object(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    apply(make_tar([member("a/", D), member("a/x", data=b"x"), member("b", data=b"b")]), dest)
    apply(
        make_tar([member("a", data=b"now a file"), member("b/", D), member("b/y", data=b"y")]), dest
    )
    assert (dest / "a").read_bytes() == b"now a file"
    assert (dest / "b/y").read_bytes() == b"y"


def test_existing_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    dest = tmp_path / "root"
    dest.mkdir()
    (dest / "f").symlink_to(outside)
    apply(make_tar([member("f", data=b"layer")]), dest)
    assert outside.read_bytes() == b"precious"
    assert not (dest / "f").is_symlink()
    assert (dest / "f").read_bytes() == b"layer"


@pytest.mark.parametrize(
    "members",
    [
        [member("../escape", data=b"x")],
        [member("a/../../escape", data=b"x")],
        [member("link", tarfile.SYMTYPE, link="/"), member("link/etc/passwd", data=b"x")],
        [member("link", tarfile.SYMTYPE, link=".."), member("link/x", data=b"x")],
        [member("hl", tarfile.LNKTYPE, link="../outside")],
        [member("hl", tarfile.LNKTYPE, link="missing")],
        [member("f", data=b"x"), member("f/child", data=b"x")],
        # a directory already used as a parent, then replaced by a symlink: the applier's
        # memo of checked directories must forget it (and what is below it)
        [
            member("d", D, mode=0o755),
            member("d/e/x", data=b"x"),
            member("d", tarfile.SYMTYPE, link="/"),
            member("d/etc/passwd", data=b"x"),
        ],
        [
            member("d/e/x", data=b"x"),
            member("d", tarfile.SYMTYPE, link=".."),
            member("d/e/escape", data=b"x"),
        ],
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "through-abs-symlink",
        "through-rel-symlink",
        "hardlink-out",
        "hardlink-missing",
        "through-file",
        "dir-replaced-by-symlink",
        "implicit-dir-replaced-by-symlink",
    ],
)
def test_unsafe_members_are_rejected(tmp_path: Path, members: list[Member]) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    dest = tmp_path / "a" / "root"
    with pytest.raises(InvalidInput):
        apply(make_tar(members), dest)
    assert outside.read_bytes() == b"precious"
    assert not (tmp_path / "a" / "escape").exists()
    assert not (tmp_path / "escape").exists()


def test_normalize_member_path() -> None:
    assert normalize_member_path("./a//b/") == "a/b"
    assert normalize_member_path("/abs/x") == "abs/x"
    assert normalize_member_path("./") == ""
    with pytest.raises(InvalidInput):
        normalize_member_path("a/../b")


def test_not_a_tar_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        apply(b"this is not a tar archive" * 40, tmp_path / "root")


def test_binary_xattr_round_trips(tmp_path: Path) -> None:
    raw = bytes([1, 0, 0, 2, 0x20, 0, 0, 0, 0xFF, 0xFE])
    ti = tarfile.TarInfo("f")
    ti.size = 1
    ti.pax_headers = {"SCHILY.xattr.user.bin": raw.decode("utf-8", "surrogateescape")}
    tar = make_tar([(ti, b"x")])
    apply(tar, tmp_path / "root")
    assert os.getxattr(tmp_path / "root/f", "user.bin") == raw
