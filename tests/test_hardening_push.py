"""Issue 11 item 7 for pushes: a blob is hashed as it is uploaded; bytes that are not the
blob never complete an upload, a build that meets them builds again and pushes the clean
image, and ``lbuild push`` of a damaged image is one line, exit 1, nothing under the tag."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import httpx
import pytest
from registry_server import (
    Registry,
    registry_fixture,  # noqa: F401 (a fixture)
    skopeo_copy,
    unique_repo,
)
from test_hardening_store import FILES, _blob, _flip, _layer, _manifest
from util import lbuild, manifest_digest, validate_layout, write_files

from cache.registry.client import MONOLITHIC_MAX, Repository, UploadMismatch
from cache.registry.reference import parse
from cache.registry.transport import Transport

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests reach a loopback registry (conftest makes every other test offline)."""
    monkeypatch.delenv("LBUILD_OFFLINE", raising=False)


def _has_blob(registry: Registry, repo: str, digest: str) -> bool:
    r = httpx.head(f"http://{registry.host}/v2/{repo}/blobs/{digest}")
    return r.status_code == 200


def _has_manifest(registry: Registry, repo: str, tag: str) -> bool:
    r = httpx.head(f"http://{registry.host}/v2/{repo}/manifests/{tag}",
                   headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    return r.status_code == 200


@pytest.mark.parametrize("size", [1000, MONOLITHIC_MAX + 5000], ids=["monolithic", "chunked"])
def test_upload_of_bytes_that_are_not_the_blob_never_completes(
    registry: Registry, tmp_path: Path, size: int
) -> None:
    data = bytearray(random.Random(size).randbytes(size))
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    data[size // 2] ^= 1  # what the store holds under that name now
    f = tmp_path / "blob"
    f.write_bytes(data)
    repo_name = unique_repo("up")
    t = Transport(registry.host)
    try:
        repo = Repository(t, parse(f"{registry.host}/{repo_name}:x"))
        with pytest.raises(UploadMismatch) as e:
            repo.upload_blob(digest, size, f)
        assert e.value.expected == digest
        assert e.value.actual == "sha256:" + hashlib.sha256(data).hexdigest()
        assert not _has_blob(registry, repo_name, digest)
        assert not _has_blob(registry, repo_name, e.value.actual)
        # a file shorter than the blob's size is a mismatch too (it used to PATCH forever)
        f.write_bytes(data[: size - 10])
        with pytest.raises(UploadMismatch):
            repo.upload_blob(digest, size, f)
        # the good bytes go up
        data[size // 2] ^= 1
        f.write_bytes(data)
        repo.upload_blob(digest, size, f)
        assert _has_blob(registry, repo_name, digest)
    finally:
        t.close()


def _pushed_digest(target: str) -> str:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{target}"], capture_output=True, check=True).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def test_build_push_with_a_corrupt_cached_layer_rebuilds_and_pushes_the_clean_image(
    registry: Registry, tmp_path: Path, home: Path
) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, FILES)
    first = tmp_path / "first"
    lbuild("build", ctx, "-o", f"type=oci,dest={first}", home=home)
    clean, m = manifest_digest(first), _manifest(first)
    layer = _layer(m, 0)
    _flip(_blob(home, layer))
    target = f"{registry.host}/{unique_repo('push')}:v1"
    p = lbuild("build", "-t", target, "--push", ctx, home=home, check=False)
    assert p.returncode == 0, p.stderr
    assert f"blob {layer} in the content store is corrupt" in p.stderr
    assert f"{target}@{clean}" in p.stdout + p.stderr
    assert _pushed_digest(target) == clean
    back = tmp_path / "back"
    skopeo_copy(f"docker://{target}", f"oci:{back}:latest", "--src-tls-verify=false")
    assert manifest_digest(back) == clean
    validate_layout(back)


def test_lbuild_push_of_a_corrupt_image_is_one_line_and_leaves_nothing_under_the_tag(
    registry: Registry, tmp_path: Path, home: Path
) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, FILES)
    out = tmp_path / "out"
    lbuild("build", ctx, "-t", "local/app:1", "-o", f"type=oci,dest={out}", home=home)
    index = json.loads((out / "index.json").read_text())
    clean = str(index["manifests"][0]["digest"])
    m = json.loads((out / "blobs" / "sha256" / clean[7:]).read_bytes())
    layer = _layer(m, 0)
    _flip(_blob(home, layer))
    repo = unique_repo("push")
    p = lbuild("push", "local/app:1", f"{registry.host}/{repo}:t", home=home, check=False)
    assert p.returncode == 1
    lines = [x for x in p.stderr.splitlines() if not x.startswith("push sha256:")]  # progress
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"blob {layer} in the content store is corrupt" in lines[0]
    assert "build the image again" in lines[0]
    assert not _has_manifest(registry, repo, "t")
    assert not _has_blob(registry, repo, layer)
    # a build makes the blob again, and the push then goes through
    lbuild("build", ctx, "-t", "local/app:1", home=home)
    p = lbuild("push", "local/app:1", f"{registry.host}/{repo}:t", home=home)
    assert p.stdout.strip() == f"{registry.host}/{repo}:t@{clean}"
