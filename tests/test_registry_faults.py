"""Retries, resume and verification through a fault-injecting proxy in front of a registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import (
    FaultProxy,
    HeaderRecorder,
    Registry,
    add_image,
    docker_config,
    put_image,
    registry_fixture,  # noqa: F401 (a fixture)
    token_registry_fixture,  # noqa: F401 (a fixture)
    unique_repo,
    write_layout,
)

from cache.errors import DigestMismatch
from cache.registry.errors import RegistryError
from cache.registry.pull import pull
from cache.registry.reference import Reference, parse
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
BIG = os.urandom(1 << 20)  # incompressible: the layer blob is about 1 MiB


@pytest.fixture
def proxied(registry: Registry, tmp_path: Path) -> Iterator[tuple[FaultProxy, Reference]]:
    """An image in the registry and a proxy in front of it; the reference goes via the proxy."""
    lay = tmp_path / "img"
    write_layout(lay, add_image(lay, [{"small": b"s" * 100}, {"big": BIG}]))
    repo = unique_repo()
    put_image(registry, lay, repo)
    proxy = FaultProxy(registry.host).start()
    yield proxy, parse(f"{proxy.host}/{repo}:latest")
    proxy.stop()


def lines(proxy: FaultProxy) -> list[str]:
    return [f"{m} {p}" for m, p, _ in proxy.log]


def ingest_files(store: BlobStore) -> list[str]:
    return [p.name for p in (store.root / "tmp").iterdir()]


def test_retries_on_drop_500_and_429(proxied: tuple[FaultProxy, Reference], tmp_path: Path) -> None:
    proxy, ref = proxied
    proxy.add(r"^GET .*/manifests/latest", "drop")
    proxy.add(r"^GET .*/blobs/", "500", times=2)
    proxy.add(r"^GET .*/blobs/", "429", retry_after="0")
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64)
    assert all(f.hits == f.times for f in proxy.faults)
    for d in (img.config.digest, *(x.digest for x in img.layers)):
        assert store.verify(Digest(d))
    assert sum(1 for x in lines(proxy) if "/manifests/latest" in x) == 2


def test_truncated_blob_resumes_with_range(
    proxied: tuple[FaultProxy, Reference], tmp_path: Path
) -> None:
    proxy, ref = proxied
    proxy.add(r"^GET .*/blobs/", "truncate", times=1)
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64, jobs=1)
    ranges = [h.get("Range") for m, p, h in proxy.log if m == "GET" and "/blobs/" in p]
    assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges
    assert all(store.verify(Digest(x.digest)) for x in img.layers)
    assert ingest_files(store) == []


def test_truncated_blob_restarts_when_range_is_ignored(
    proxied: tuple[FaultProxy, Reference], tmp_path: Path
) -> None:
    proxy, ref = proxied
    proxy.add(r"^GET .*/blobs/", "truncate", times=1)
    proxy.add(r"^GET .*/blobs/", "norange", times=1)
    store = BlobStore(tmp_path / "home")
    img = pull(store, ref, platform=AMD64, jobs=1)
    assert all(store.verify(Digest(x.digest)) for x in img.layers)
    assert ingest_files(store) == []


def test_flipped_byte_is_an_error_and_nothing_is_stored(
    proxied: tuple[FaultProxy, Reference], tmp_path: Path
) -> None:
    proxy, ref = proxied
    proxy.add(r"^GET .*/blobs/", "flip", times=100)
    store = BlobStore(tmp_path / "home")
    with pytest.raises(DigestMismatch) as err:
        pull(store, ref, platform=AMD64)
    assert err.value.exit_code == 1
    assert list(store.digests()) == [] and ingest_files(store) == []
    proxy.faults.clear()
    proxy.add(r"^GET .*/manifests/", "flip")
    with pytest.raises(DigestMismatch, match="manifest"):
        pull(store, ref.with_digest(_manifest_digest(proxy, ref)), platform=AMD64)
    assert list(store.digests()) == []


def _manifest_digest(proxy: FaultProxy, ref: Reference) -> str:
    from cache.registry.pull import remote_digest

    return remote_digest(ref)


def test_retries_are_bounded(proxied: tuple[FaultProxy, Reference], tmp_path: Path) -> None:
    proxy, ref = proxied
    proxy.add(r"^GET .*/manifests/", "500", times=1000)
    with pytest.raises(RegistryError) as err:
        pull(BlobStore(tmp_path / "home"), ref, platform=AMD64)
    assert "injected" in str(err.value) and str(ref) in str(err.value)
    assert len(proxy.log) == 5  # the first try and four retries


def test_authorization_does_not_follow_a_cross_origin_redirect(
    token_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lay = tmp_path / "img"
    write_layout(lay, add_image(lay, [{"f": b"x"}]))
    repo = unique_repo()
    put_image(token_registry, lay, repo)
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(tmp_path / "docker",
                                                          "placeholder")))
    proxy = FaultProxy(token_registry.host).start()
    other = HeaderRecorder()
    try:
        docker_config(tmp_path / "docker", proxy.host)
        proxy.redirect_to = other.host
        proxy.add(r"^GET .*/blobs/", "redirect", times=100)
        with pytest.raises(RegistryError, match="blob unknown"):
            pull(BlobStore(tmp_path / "home"), parse(f"{proxy.host}/{repo}:latest"),
                 platform=AMD64, jobs=1)
        sent = [h for m, p, h in proxy.log if m == "GET" and "/blobs/" in p]
        assert sent and all(h.get("Authorization", "").startswith("Bearer ") for h in sent)
        assert other.seen and all("Authorization" not in h for h in other.seen)
    finally:
        proxy.stop()
        other.stop()


KILLED_PULL = """
import sys
from cache.registry.pull import pull
from cache.registry.reference import parse
from cache.store.blobs import BlobStore
def progress(d, n, t):
    if n < t:
        print("started", flush=True)
        sys.stdin.readline()  # wait here, mid-blob, until the test kills us
pull(BlobStore(sys.argv[1]), parse(sys.argv[2]), platform=("linux", "amd64", ""),
     progress=progress, jobs=1)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_pull_leaves_no_partial_blob(
    proxied: tuple[FaultProxy, Reference], tmp_path: Path, sig: signal.Signals
) -> None:
    _, ref = proxied
    home = tmp_path / "home"
    p = subprocess.Popen([sys.executable, "-c", KILLED_PULL, str(home), str(ref)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "started"
    p.send_signal(sig)
    p.stdin.close()  # lets a SIGINTed pull's worker reach its next chunk and stop there
    p.wait(60)
    assert p.returncode != 0
    store = BlobStore(home)
    for d in store.digests():
        assert store.verify(d)  # whatever is visible is whole
    big = [x for x in store.digests() if store.size(x) >= len(BIG)]
    assert big == []
    if sig == signal.SIGINT:  # it could clean up: no temp file either
        assert ingest_files(store) == []
