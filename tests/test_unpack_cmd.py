"""``lbuild unpack IMAGE DIR`` through the real CLI: local tags and oci-layout:// images give
the tree umoci gives; every layer is verified while applied (a corrupt blob is named, exit 1,
nothing written); DIR must be new or empty."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import run_fixtures
from busybox import make_busybox_rootfs
from run_fixtures import build, image_config, image_manifest, needs_root
from test_run import xattr_tar
from util import lbuild, tree, umoci_unpack

busybox_home = run_fixtures.busybox_home
pytestmark = [needs_root, pytest.mark.slow]

TAG = "lbuild-test/unpack:v1"
DOCKERFILE = """\
FROM busybox:test
ADD xattr.tar /x/
RUN set -e; umask 022; mkdir -p /d/sub /gone; echo payload-content > /d/sub/f; echo g > /gone/g; \\
    echo h > /h1; ln /h1 /h2; echo s > /s; chmod 4755 /s; mkfifo /fifo; ln -s d/sub /rel; \\
    chown app:app /d/sub
RUN set -e; umask 022; rm -rf /gone /d; mkdir -p /d/new; echo new > /d/new/f; rm /bin/vi; \\
    echo top > /top
"""


@dataclass(frozen=True)
class Img:
    """The test image, tagged in ``home`` and exported as an OCI layout (tag v1)."""

    home: Path
    layout: Path
    umoci_tree: dict[str, tuple[object, ...]]


@pytest.fixture(scope="module")
def img(busybox_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Img:
    root = tmp_path_factory.mktemp("unpack")
    b = build(root / "ctx", busybox_home, DOCKERFILE, "-t", TAG, files={"xattr.tar": xattr_tar()})
    rootfs = umoci_unpack(b.layout, root / "bundle", tag="v1")
    return Img(busybox_home, b.layout, tree(rootfs))


@pytest.fixture
def home(img: Img, tmp_path: Path) -> Path:
    """A private copy of the module's home (blobs and index), free to corrupt."""
    h = tmp_path / "home"
    h.mkdir()
    shutil.copytree(img.home / "blobs", h / "blobs")
    for db in img.home.glob("lbuild.db*"):
        shutil.copy2(db, h / db.name)
    return h


def unpack(image: str, dest: Path, home: Path, check: bool = True) -> tuple[int, str]:
    p = lbuild("unpack", image, dest, home=home, check=check)
    return p.returncode, p.stderr


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbuild: error: "), err
    return lines[0]


def store_blob(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest.split(":", 1)[1]


def layer_digests(layout: Path, tag: str = "v1") -> tuple[list[str], list[str]]:
    """(compressed layer digests, diff_ids) of the image tagged ``tag`` in ``layout``."""
    layers = image_manifest(layout, tag)["layers"]
    return [x["digest"] for x in layers], image_config(layout, tag)["rootfs"]["diff_ids"]


def flip_byte(path: Path, needle: bytes | None = None) -> None:
    """Change one byte of a (read-only) blob: inside ``needle`` when given, else mid-file."""
    data = bytearray(path.read_bytes())
    at = data.index(needle) + 3 if needle else len(data) // 2
    data[at] ^= 0x20
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def test_local_tag_gives_the_tree_umoci_gives(img: Img, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    code, err = unpack(TAG, dest, img.home)
    assert code == 0, err
    got = tree(dest)
    assert got == img.umoci_tree
    assert got["d/new/f"][0] == "file" and "d/sub" not in got and "gone" not in got
    assert "bin/vi" not in got and got["bin/sh"][0] == "symlink"
    assert got["s"][1] == 0o4755 and got["fifo"][0] == "other"
    assert os.stat(dest / "h1").st_ino == os.stat(dest / "h2").st_ino
    assert os.getxattr(dest / "x" / "f", "user.test") == b"v1"


def test_oci_layout_with_and_without_tag(img: Img, tmp_path: Path) -> None:
    code, err = unpack(f"oci-layout://{img.layout}:v1", tmp_path / "a", img.home)
    assert code == 0, err
    assert tree(tmp_path / "a") == img.umoci_tree
    # Without a tag: latest, which this layout does not have.
    code, err = unpack(f"oci-layout://{img.layout}", tmp_path / "b", img.home, check=False)
    assert code == 2 and "latest" in one_line_error(err)
    assert not (tmp_path / "b").exists()


def test_busybox_image_is_the_busybox_rootfs(img: Img, tmp_path: Path) -> None:
    code, err = unpack("busybox:test", tmp_path / "bb", img.home)
    assert code == 0, err
    assert tree(tmp_path / "bb") == tree(make_busybox_rootfs(tmp_path / "expected"))


def test_destination_rules(img: Img, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert unpack(TAG, empty, img.home)[0] == 0
    assert (empty / "top").read_text() == "top\n"

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("mine")
    code, err = unpack(TAG, full, img.home, check=False)
    assert code == 2 and "not empty" in one_line_error(err)
    assert [p.name for p in full.iterdir()] == ["keep"]

    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = unpack(TAG, afile, img.home, check=False)
    assert code == 2 and "not a directory" in one_line_error(err)
    assert afile.read_text() == "x"

    code, err = unpack(TAG, tmp_path / "no" / "such" / "dir", img.home, check=False)
    assert code == 2 and "does not exist" in one_line_error(err)


def test_unknown_image(img: Img, tmp_path: Path) -> None:
    code, err = unpack("nosuch:tag", tmp_path / "o", img.home, check=False)
    assert code == 2 and "nosuch:tag" in one_line_error(err)
    code, err = unpack(f"oci-layout://{tmp_path}/none", tmp_path / "o", img.home, check=False)
    assert code == 2 and "not an OCI layout" in one_line_error(err)
    assert not (tmp_path / "o").exists()


def no_work_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".unpack-" in p.name]


def test_corrupt_layer_in_the_store_is_named_and_nothing_is_written(
    img: Img, home: Path, tmp_path: Path
) -> None:
    _blobs, diff_ids = layer_digests(img.layout)
    bad = diff_ids[4]  # the first RUN layer; its tar holds payload-content
    flip_byte(store_blob(home, bad), b"payload-content")
    out = tmp_path / "out"
    code, err = unpack(TAG, out, home, check=False)
    line = one_line_error(err)
    assert code == 1
    assert bad in line and "digest mismatch" in line
    assert not out.exists() and no_work_dirs(tmp_path)


def test_unpacks_from_compressed_blobs_when_the_tars_are_gone(
    img: Img, home: Path, tmp_path: Path
) -> None:
    _blobs, diff_ids = layer_digests(img.layout)
    for d in diff_ids:
        store_blob(home, d).unlink()
    code, err = unpack(TAG, tmp_path / "out", home)
    assert code == 0, err
    assert tree(tmp_path / "out") == img.umoci_tree


def test_corrupt_compressed_blob_is_named(img: Img, home: Path, tmp_path: Path) -> None:
    blobs, diff_ids = layer_digests(img.layout)
    for d in diff_ids:
        store_blob(home, d).unlink()
    flip_byte(store_blob(home, blobs[4]))
    code, err = unpack(TAG, tmp_path / "out", home, check=False)
    line = one_line_error(err)
    assert code == 1 and blobs[4] in line and "digest mismatch" in line
    assert not (tmp_path / "out").exists() and no_work_dirs(tmp_path)


def test_zstd_image(img: Img, home: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    b = build(
        ctx,
        home,
        DOCKERFILE,
        "-t",
        "lbuild-test/unpack:zstd",
        "--compression",
        "zstd",
        files={"xattr.tar": xattr_tar()},
    )
    # The base image keeps its gzip blobs; this build's own layers are zstd: both codecs.
    media = [x["mediaType"].rpartition("+")[2] for x in image_manifest(b.layout, "zstd")["layers"]]
    assert media == ["gzip"] * 3 + ["zstd"] * 3
    _blobs, diff_ids = layer_digests(b.layout, "zstd")
    for d in diff_ids:
        store_blob(home, d).unlink()  # force the zstd path
    code, err = unpack("lbuild-test/unpack:zstd", tmp_path / "out", home)
    assert code == 0, err
    assert tree(tmp_path / "out") == img.umoci_tree


def test_corrupt_blob_in_an_oci_layout_is_named(img: Img, home: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    shutil.copytree(img.layout, layout)
    blobs, _ = layer_digests(layout)
    flip_byte(layout / "blobs" / "sha256" / blobs[5].split(":", 1)[1])
    code, err = unpack(
        f"oci-layout://{layout}:v1", tmp_path / "out", tmp_path / "fresh-home", check=False
    )
    line = one_line_error(err)
    assert code == 1 and blobs[5].split(":", 1)[1] in line and "digest mismatch" in line
    assert not (tmp_path / "out").exists()
