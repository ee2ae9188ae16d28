"""The store never serves what it did not verify (issue 11 items 7 and 8): a blob that no
longer matches its name is found as it leaves the store (export, compression) and rebuilt,
never output; the no-op fast path falls back to the normal path on any inconsistency."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from util import lbuild, manifest_digest, validate_layout, write_files

FILES: dict[str, str | bytes] = {
    "Dockerfile": "FROM scratch\nCOPY a /a\nENV X=1\nCOPY b /b\n",
    "a": bytes(range(256)) * 512,
    "b": "b\n",
}


def _blob(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest.split(":", 1)[1]


def _flip(path: Path, at: int = 100) -> None:
    """Flip one bit of a file in place (the same inode: layouts that hardlink it see it too)."""
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(layout: Path) -> dict[str, object]:
    d = manifest_digest(layout)
    return json.loads((layout / "blobs" / "sha256" / d.split(":")[1]).read_bytes())  # type: ignore[no-any-return]


@pytest.fixture
def built(tmp_path: Path, home: Path) -> tuple[Path, str, dict[str, object]]:
    ctx = tmp_path / "ctx"
    write_files(ctx, FILES)
    first = tmp_path / "first"
    lbuild("build", ctx, "-o", f"type=oci,dest={first}", home=home)
    return ctx, manifest_digest(first), _manifest(first)


def _layer(m: dict[str, object], i: int) -> str:
    return m["layers"][i]["digest"]  # type: ignore[index,no-any-return]


def test_flipped_bit_in_a_cached_compressed_layer_is_not_exported(
    tmp_path: Path, home: Path, built: tuple[Path, str, dict[str, object]]
) -> None:
    ctx, clean, m = built
    layer = _layer(m, 0)
    _flip(_blob(home, layer))
    for n, extra in enumerate((["--no-cache-filter", "nothing"], [])):  # normal path, fast path
        out = tmp_path / f"out{n}"
        p = lbuild("build", ctx, "-o", f"type=oci,dest={out}", *extra, home=home, check=False)
        assert p.returncode == 0, p.stderr
        assert manifest_digest(out) == clean
        assert _sha(out / "blobs" / "sha256" / layer.split(":")[1]) == layer
        validate_layout(out)
        if n == 0:
            assert "corrupt" in p.stderr
            _flip(_blob(home, layer))  # again, for the fast path
    assert _sha(_blob(home, layer)) == layer  # the store holds the good bytes again


def test_flipped_bit_in_a_layer_tar_is_rebuilt_for_a_docker_archive(
    tmp_path: Path, home: Path, built: tuple[Path, str, dict[str, object]]
) -> None:
    ctx, _clean, _m = built
    config = json.loads(
        _blob(home, _manifest(tmp_path / "first")["config"]["digest"]).read_bytes()  # type: ignore[index]
    )
    diff_id = config["rootfs"]["diff_ids"][0]
    _flip(_blob(home, diff_id), at=600)
    archive = tmp_path / "img.tar"
    p = lbuild("build", ctx, "-o", f"type=docker,dest={archive}", home=home)
    assert "corrupt" in p.stderr
    with tarfile.open(archive) as tf:
        data = tf.extractfile(f"{diff_id.split(':')[1]}/layer.tar")
        assert data is not None
        assert "sha256:" + hashlib.sha256(data.read()).hexdigest() == diff_id
    assert _sha(_blob(home, diff_id)) == diff_id


@pytest.mark.parametrize("damage", ["truncate config", "flip manifest"])
def test_damaged_image_blob_does_not_wedge_the_fast_path(
    tmp_path: Path, home: Path, built: tuple[Path, str, dict[str, object]], damage: str
) -> None:
    ctx, clean, m = built
    if damage == "truncate config":
        path = _blob(home, m["config"]["digest"])  # type: ignore[index]
        path.chmod(0o644)
        os.truncate(path, path.stat().st_size // 2)
    else:
        _flip(_blob(home, clean), at=10)
    for n in range(2):  # the build that meets the damage, and the one after it
        out = tmp_path / f"out{n}"
        p = lbuild("build", ctx, "-o", f"type=oci,dest={out}", home=home, check=False)
        assert p.returncode == 0, p.stderr
        assert "error" not in p.stderr
        assert manifest_digest(out) == clean
        validate_layout(out)
    assert lbuild("cache", "verify", home=home).stdout.splitlines() == [
        "cache verified: no corruption"
    ]
