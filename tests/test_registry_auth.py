"""Credentials, TLS and token auth against real registries (TLS+htpasswd, Bearer tokens)."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
from pathlib import Path

import pytest
from registry_server import (
    PASSWORD,
    REFRESH_TOKEN,
    Registry,
    add_image,
    docker_config,
    free_port,
    put_image,
    registry_fixture,  # noqa: F401 (a fixture)
    tls_registry_fixture,  # noqa: F401 (a fixture)
    token_registry_fixture,  # noqa: F401 (a fixture)
    unique_repo,
    write_layout,
)

from cache.registry.auth import Credentials, credentials_for
from cache.registry.errors import RegistryError
from cache.registry.pull import pull
from cache.registry.push import push
from cache.registry.reference import parse
from cache.registry.transport import Transport, insecure_allowed, is_loopback, parse_challenge
from cache.store.blobs import BlobStore

AMD64 = ("linux", "amd64", "")


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests reach loopback registries (conftest makes every other test offline)."""
    monkeypatch.delenv("LBUILD_OFFLINE", raising=False)



@pytest.fixture
def no_creds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credential source from the real environment reaches the test."""
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    return d


def one_image(tmp: Path) -> Path:
    lay = tmp / "img"
    write_layout(lay, add_image(lay, [{"hello": b"world" * 50}]))
    return lay


# -- unit: credential sources ---------------------------------------------------------------
def test_credential_sources_in_order(
    no_creds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = base64.b64encode(b"u1:p1").decode()
    (no_creds / "config.json").write_text(json.dumps({
        "auths": {"https://index.docker.io/v1/": {"auth": auth},
                  "reg.example:5000": {"identitytoken": "idt"}},
        "credHelpers": {"helped.example": "lbtest"},
        "credsStore": "lbtest",
    }))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-lbtest"
    helper.write_text('#!/bin/sh\nread server\ncase "$server" in\n'
                      '  helped.example) echo \'{"Username":"hu","Secret":"hs"}\' ;;\n'
                      '  store.example) echo \'{"Username":"<token>","Secret":"tok"}\' ;;\n'
                      '  *) echo "credentials not found in native keychain"; exit 1 ;;\nesac\n')
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert credentials_for("registry-1.docker.io") == Credentials("u1", "p1")
    assert credentials_for("reg.example:5000") == Credentials(identity_token="idt")
    assert credentials_for("helped.example") == Credentials("hu", "hs")
    assert credentials_for("store.example") == Credentials(identity_token="tok")
    assert credentials_for("other.example") is None
    # podman's files come first
    xdg = tmp_path / "xdg" / "containers"
    xdg.mkdir(parents=True)
    (xdg / "auth.json").write_text(json.dumps(
        {"auths": {"docker.io": {"auth": base64.b64encode(b"pod:man").decode()}}}))
    assert credentials_for("registry-1.docker.io") == Credentials("pod", "man")
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps(
        {"auths": {"docker.io": {"auth": base64.b64encode(b"env:file").decode()}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(authfile))
    assert credentials_for("registry-1.docker.io") == Credentials("env", "file")
    assert "file" not in repr(Credentials("env", "file")) and "file" not in str(
        Credentials("env", "file"))


def test_insecure_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.3.4.5", "[::1]:5000"):
        assert is_loopback(host) and insecure_allowed(host), host
    monkeypatch.setenv("LBUILD_INSECURE_REGISTRIES", "reg.lan:5000, other.lan")
    assert insecure_allowed("reg.lan:5000") and insecure_allowed("other.lan:443")
    assert not insecure_allowed("reg.lan:5001") and not insecure_allowed("ghcr.io")


def test_challenge_parsing() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                         'scope="repository:a/b:pull,push"')
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "reg",
                         "scope": "repository:a/b:pull,push"}
    basic = parse_challenge('Basic realm="x"')
    assert basic is not None and basic.scheme == "basic"
    assert parse_challenge("Negotiate abc") is None


# -- TLS + htpasswd ---------------------------------------------------------------------------
def test_tls_basic_auth(
    tls_registry: Registry, no_creds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = tls_registry
    ref = parse(put_image(reg, one_image(tmp_path), unique_repo()))
    store = BlobStore(tmp_path / "home")
    # no CA for it: a TLS error, never a downgrade to plain HTTP
    monkeypatch.setenv("LBUILD_CERTS_D", str(tmp_path / "empty-certs.d"))
    with pytest.raises(RegistryError, match="certificate not trusted"):
        pull(store, ref, platform=AMD64)
    monkeypatch.setenv("LBUILD_CERTS_D", str(reg.certs_d))
    with pytest.raises(RegistryError) as err:
        pull(store, ref, platform=AMD64)
    assert "pull access denied or repository does not exist" in str(err.value)
    assert str(ref) in str(err.value) and err.value.exit_code == 1
    docker_config(no_creds, reg.host)
    img = pull(store, ref, platform=AMD64)
    target = parse(f"{reg.host}/{unique_repo('pushed')}:v1")
    (res,) = push(store, img.manifest_digest, [target])
    assert res.digest == img.manifest_digest and len(res.uploaded) == 2
    # wrong password: unauthorized, and the password is in no message
    docker_config(no_creds, reg.host, password="wrong-pw-123")
    with pytest.raises(RegistryError) as err:
        pull(BlobStore(tmp_path / "home2"), ref, platform=AMD64)
    assert "wrong-pw-123" not in str(err.value) and PASSWORD not in str(err.value)


def test_the_scheme_of_a_loopback_registry_is_told_without_loading_the_trust_store(
    registry: Registry, tls_registry: Registry, no_creds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cache.registry import transport

    assert transport.speaks_tls(registry.host) is False
    assert transport.speaks_tls(tls_registry.host) is True
    assert transport.speaks_tls(f"127.0.0.1:{free_port()}") is None  # nothing listens
    made: list[ssl.SSLContext] = []
    real = transport.ssl_context

    def keep(host: str) -> ssl.SSLContext:
        made.append(real(host))
        return made[-1]

    monkeypatch.setattr(transport, "ssl_context", keep)
    monkeypatch.setenv("LBUILD_CERTS_D", str(tls_registry.certs_d))
    for reg in (registry, tls_registry):
        transport._SCHEMES.pop(reg.host, None)  # as in a new process
        with Transport(reg.host) as t:
            assert t.request("GET", "/v2/", scopes=()).status_code in (200, 401)
            assert t.requests == [("GET", "/v2/")]  # one request: no failed HTTPS attempt
    plain, tls = made
    assert isinstance(plain, transport._Trust) and isinstance(tls, transport._Trust)
    assert plain._loaded is False  # plain HTTP: the system bundle was never loaded
    assert tls._loaded is True


def test_the_http_stack_leaves_out_the_async_loop_and_the_httpx_command() -> None:
    import subprocess
    import sys

    code = ("import sys; import cache.registry.transport; "
            "print(sorted(m for m in ('trio', 'httpx._main', 'rich') if m in sys.modules)); "
            "import importlib.util; print(importlib.util.find_spec('httpx._main') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # importable again afterwards: only skipped for httpx's own import


# -- Bearer tokens ------------------------------------------------------------------------------
def test_token_auth_caches_tokens_per_scope(
    token_registry: Registry, no_creds: Path, tmp_path: Path
) -> None:
    reg = token_registry
    assert reg.tokens is not None
    ref = parse(put_image(reg, one_image(tmp_path), unique_repo()))
    store = BlobStore(tmp_path / "home")
    with pytest.raises(RegistryError) as err:
        pull(store, ref, platform=AMD64)
    assert "unauthorized" in str(err.value)
    docker_config(no_creds, reg.host)
    before = len(reg.tokens.requests)
    with Transport(reg.host) as t:
        img = pull(store, ref, platform=AMD64, transport=t)
        assert len(t.requests) == 4  # the manifest (401, then with a token), config, layer
    issued = reg.tokens.requests[before:]
    assert len(issued) == 1 and issued[0]["auth"]
    assert issued[0]["scope"] == [f"repository:{ref.path}:pull"]
    assert issued[0]["service"] == reg.tokens.service
    # a push to another repository asks for its own scope, and the mount for both
    target = parse(f"{reg.host}/{unique_repo('dest')}:latest")
    mount_from = {d.digest: ref.repository for d in (img.config, *img.layers)}
    (res,) = push(store, img.manifest_digest, [target], mount_from=mount_from)
    assert sorted(res.mounted) == sorted(mount_from)
    scopes = [r["scope"] for r in reg.tokens.requests[before + 1 :]]
    assert [f"repository:{target.path}:pull,push"] in scopes
    assert [f"repository:{target.path}:pull,push", f"repository:{ref.path}:pull"] in scopes
    assert len(scopes) == 2  # one token per scope set, reused for every blob


def test_identity_token_uses_the_refresh_grant(
    token_registry: Registry, no_creds: Path, tmp_path: Path
) -> None:
    reg = token_registry
    assert reg.tokens is not None
    ref = parse(put_image(reg, one_image(tmp_path), unique_repo()))
    (no_creds / "config.json").write_text(json.dumps(
        {"auths": {reg.host: {"identitytoken": REFRESH_TOKEN}}}))
    img = pull(BlobStore(tmp_path / "home"), ref, platform=AMD64)
    assert img.layers
    assert reg.tokens.requests[-1]["method"] == "POST" and reg.tokens.requests[-1]["auth"]



def test_threads_of_one_build_probe_a_registry_s_scheme_once(
    registry: Registry, no_creds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from cache.registry import transport

    monkeypatch.setattr(transport, "_SCHEMES", {})
    probes: list[str] = []
    real = transport.speaks_tls

    def counted(host: str, timeout: float = 15.0) -> bool | None:
        probes.append(host)
        return real(host, timeout)

    monkeypatch.setattr(transport, "speaks_tls", counted)
    # the cache's records and the base image: two transports to one registry, at once
    ts = [Transport(registry.host) for _ in range(4)]
    go = threading.Barrier(len(ts))

    def first_request(t: Transport) -> None:
        go.wait()
        t._choose_scheme()

    threads = [threading.Thread(target=first_request, args=(t,)) for t in ts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert probes == [registry.host]
    assert [t._scheme for t in ts] == ["http"] * len(ts)
