"""Pull and push against a real docker-registry on loopback; skopeo puts and checks images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from registry_server import (
    FaultProxy,
    Registry,
    add_image,
    add_index,
    put_image,
    registry_fixture,  # noqa: F401 (a fixture)
    skopeo_copy,
    unique_repo,
    write_layout,
)

from cache.errors import NotFound
from cache.registry import client as client_mod
from cache.registry.client import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from cache.registry.errors import RegistryError
from cache.registry.pull import parse_platform, pull, remote_digest
from cache.registry.push import push
from cache.registry.reference import parse
from cache.registry.transport import Transport
from cache.store.blobs import BlobStore
from cache.types import Digest

AMD64 = ("linux", "amd64", "")


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests reach loopback registries (conftest makes every other test offline)."""
    monkeypatch.delenv("LBUILD_OFFLINE", raising=False)



@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries wait 10 ms, 20 ms, ... here (the count of retries is what is tested)."""
    from cache.registry import transport

    monkeypatch.setattr(transport, "BACKOFF_S", 0.01)
ARM64 = ("linux", "arm64", "")


def two_platforms(tmp: Path, *, attestation: bool = True) -> tuple[Path, dict[str, str]]:
    """An OCI layout whose index holds amd64, arm64/v8 and an attestation (unknown/unknown)."""
    lay = tmp / "multi"
    a = add_image(lay, [{"etc/os": b"amd64"}, {"usr/x": b"x" * 5000}], arch="amd64")
    b = add_image(lay, [{"etc/os": b"arm64"}], arch="arm64", variant="v8")
    att = add_image(lay, [{"sbom.json": b"{}"}], arch="unknown", os_="unknown")
    att["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
    write_layout(lay, add_index(lay, [att, a, b] if attestation else [a, b]))
    return lay, {"amd64": a["digest"], "arm64": b["digest"]}


def blob_gets(t: Transport) -> list[str]:
    return [p for m, p in t.requests if m == "GET" and "/blobs/" in p]


def test_index_picks_the_platform_and_skips_attestations(registry: Registry, tmp_path: Path) -> None:
    lay, digests = two_platforms(tmp_path)
    ref = parse(put_image(registry, lay, unique_repo(), "--all"))
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64)
    assert img.manifest_digest == digests["amd64"]
    assert img.media_type == OCI_MANIFEST
    assert img.index_digest is not None and store.has(Digest(img.index_digest))
    assert json.loads(store.read(Digest(img.index_digest)))["mediaType"] == OCI_INDEX
    for d in (img.manifest_digest, img.config.digest, *(x.digest for x in img.layers)):
        assert store.verify(Digest(d))
    # arm64 without a variant matches the arm64/v8 entry; its blobs are fetched, the index not
    arm = pull(store, ref, platform=parse_platform("linux/arm64"))
    assert arm.manifest_digest == digests["arm64"]
    with pytest.raises(RegistryError) as err:
        pull(store, ref, platform=("linux", "s390x", ""))
    assert "no match for platform linux/s390x in the manifest list" in str(err.value)
    assert err.value.exit_code == 1
    with pytest.raises(RegistryError, match="no match for platform unknown/unknown"):
        pull(store, ref, platform=("unknown", "unknown", ""))


def test_second_pull_fetches_no_blob_and_digest_pull_no_request(
    registry: Registry, tmp_path: Path
) -> None:
    lay, _ = two_platforms(tmp_path)
    ref = parse(put_image(registry, lay, unique_repo(), "--all"))
    store = BlobStore(tmp_path / "home")
    with Transport(ref.registry_host) as t:
        first = pull(store, ref, platform=AMD64, transport=t)
        assert len(blob_gets(t)) == 3
    assert len(first.fetched) == 3
    with Transport(ref.registry_host) as t:
        again = pull(store, ref, platform=AMD64, transport=t)
        assert blob_gets(t) == [] and again.fetched == ()
        assert [m for m, _ in t.requests] == ["GET"]  # the tag's index; the child is local
    pinned = ref.with_digest(again.index_digest or "")
    with Transport(ref.registry_host) as t:
        pull(store, pinned, platform=AMD64, transport=t)
        assert t.requests == []
        assert remote_digest(ref, transport=t) == again.index_digest
        assert [m for m, _ in t.requests] == ["HEAD"]


def test_docker_schema2_and_zstd_layers(registry: Registry, tmp_path: Path) -> None:
    lay = tmp_path / "plain"
    write_layout(lay, add_image(lay, [{"a": b"1"}, {"b": b"2" * 3000}]))
    repo = unique_repo()
    ref = parse(put_image(registry, lay, repo, "--format", "v2s2"))
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64)
    assert img.media_type == DOCKER_MANIFEST
    assert all(x.media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
               for x in img.layers)
    raw = store.read(Digest(img.manifest_digest))
    assert json.loads(raw)["mediaType"] == DOCKER_MANIFEST  # raw bytes kept as sent
    zlay = tmp_path / "zstd"
    write_layout(zlay, add_image(zlay, [{"z": b"zz" * 4000}], codec="zstd"))
    zref = parse(put_image(registry, zlay, unique_repo()))
    zimg = pull(store, zref, platform=AMD64)
    assert [x.media_type for x in zimg.layers] == ["application/vnd.oci.image.layer.v1.tar+zstd"]
    assert store.verify(Digest(zimg.layers[0].digest))


def test_unknown_tag_and_repository(registry: Registry, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "home")
    with pytest.raises(RegistryError) as err:
        pull(store, parse(f"{registry.host}/no/such:tag"), platform=AMD64)
    assert "manifest unknown" in str(err.value)
    assert f"{registry.host}/no/such:tag" in str(err.value)
    assert list(store.digests()) == []


def test_push_mounts_heads_and_round_trips(registry: Registry, tmp_path: Path) -> None:
    lay, _ = two_platforms(tmp_path)
    src = parse(put_image(registry, lay, unique_repo("base"), "--all"))
    store = BlobStore(tmp_path / "home")
    img = pull(store, src, platform=AMD64)
    target = parse(f"{registry.host}/{unique_repo('app')}:v1")
    mount_from = {d.digest: src.repository for d in (img.config, *img.layers)}
    progress: list[tuple[str, int, int]] = []
    (res,) = push(store, img.manifest_digest, [target], mount_from=mount_from,
                  progress=lambda d, n, t: progress.append((d, n, t)))
    assert res.digest == img.manifest_digest
    assert sorted(res.mounted) == sorted(mount_from) and res.uploaded == ()
    assert {d for d, n, t in progress if n == t} == set(mount_from)
    out = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{target}"], capture_output=True, check=True)
    assert out.stdout == store.read(Digest(img.manifest_digest))
    # a second push sends no blob (HEAD says present); another tag in one call
    t2 = target.with_tag("v2")
    r1, r2 = push(store, img.manifest_digest, [target, t2])
    assert r1.uploaded == r2.uploaded == () and len(r1.present) == 3
    back = tmp_path / "back"
    skopeo_copy(f"docker://{t2}", f"oci:{back}:latest", "--src-tls-verify=false")
    index = json.loads((back / "index.json").read_text())
    assert index["manifests"][0]["digest"] == img.manifest_digest


def test_chunked_upload_and_index_push(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay, _ = two_platforms(tmp_path, attestation=False)
    ref = parse(put_image(registry, lay, unique_repo("src"), "--all"))
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64)
    monkeypatch.setattr(client_mod, "MONOLITHIC_MAX", 100)
    monkeypatch.setattr(client_mod, "UPLOAD_CHUNK", 64)
    target = parse(f"{registry.host}/{unique_repo('chunked')}:latest")
    with pytest.raises(NotFound):  # the index names arm64 blobs this store never fetched
        push(store, img.index_digest or "", [target])
    (res,) = push(store, img.manifest_digest, [target])
    assert len(res.uploaded) == 3
    back = tmp_path / "back"
    skopeo_copy(f"docker://{target}", f"oci:{back}:latest", "--src-tls-verify=false")
    for d in (img.config.digest, *(x.digest for x in img.layers)):
        assert (back / "blobs" / "sha256" / d[7:]).read_bytes() == store.read(Digest(d))
    pull(store, ref, platform=ARM64)
    (res,) = push(store, img.index_digest or "", [target.with_tag("all")])
    assert res.digest == img.index_digest


def test_failed_push_leaves_no_manifest(registry: Registry, tmp_path: Path) -> None:
    lay = tmp_path / "one"
    write_layout(lay, add_image(lay, [{"f": b"data" * 100}]))
    ref = parse(put_image(registry, lay, unique_repo()))
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64)
    proxy = FaultProxy(registry.host).start()
    try:
        proxy.add(r"^PUT .*/blobs/uploads/", "500", times=1000)
        repo = unique_repo("broken")
        with pytest.raises(RegistryError) as err:
            push(store, img.manifest_digest, [parse(f"{proxy.host}/{repo}:latest")])
        assert err.value.exit_code == 1 and "injected" in str(err.value)
        assert not any(m == "PUT" and "/manifests/" in p for m, p, _ in proxy.log)
    finally:
        proxy.stop()
    probe = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                            f"docker://{registry.host}/{repo}:latest"], capture_output=True)
    assert probe.returncode != 0
