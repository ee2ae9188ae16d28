"""References parse exactly as Docker's (distribution/reference ParseNormalizedNamed)."""

from __future__ import annotations

import pytest

from cache.errors import InvalidInput, Unsupported
from cache.registry.reference import parse

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "domain", "path", "tag", "digest"),
    [
        ("alpine", "docker.io", "library/alpine", "latest", None),
        ("alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("library/alpine", "docker.io", "library/alpine", "latest", None),
        ("docker.io/library/alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("docker.io/alpine", "docker.io", "library/alpine", "latest", None),
        ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", None),
        ("user/repo", "docker.io", "user/repo", "latest", None),
        ("ghcr.io/o/r:t", "ghcr.io", "o/r", "t", None),
        ("host:5000/a/b:t", "host:5000", "a/b", "t", None),
        ("localhost/a", "localhost", "a", "latest", None),
        ("localhost:5000/a", "localhost:5000", "a", "latest", None),
        ("127.0.0.1:5000/x/y:latest", "127.0.0.1:5000", "x/y", "latest", None),
        ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
        ("Registry/x", "Registry", "x", "latest", None),
        (f"alpine@{D}", "docker.io", "library/alpine", None, D),
        (f"alpine:3.20@{D}", "docker.io", "library/alpine", "3.20", D),
        (f"ghcr.io/o/r:t@{D}", "ghcr.io", "o/r", "t", D),
        ("a/b/c/d", "docker.io", "a/b/c/d", "latest", None),
        ("a_b/c__d/e-f/g--h/i.j", "docker.io", "a_b/c__d/e-f/g--h/i.j", "latest", None),
        ("x:" + "T" * 128, "docker.io", "library/x", "T" * 128, None),
        ("my-reg.example.com/o/r:v1.2_3-rc", "my-reg.example.com", "o/r", "v1.2_3-rc", None),
    ],
)
def test_valid(text: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    r = parse(text)
    assert (r.domain, r.path, r.tag, r.digest) == (domain, path, tag, digest)
    assert r.reference == (digest or tag)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid reference format"),
        ("Alpine", "invalid reference format: repository name (Alpine) must be lowercase"),
        ("library/Alpine", "must be lowercase"),
        ("ghcr.io/O/r", "must be lowercase"),
        ("alpine:", "invalid reference format"),
        (":tag", "invalid reference format"),
        ("alpine:-bad", "invalid reference format"),
        ("alpine:" + "t" * 129, "invalid reference format"),
        ("a//b", "invalid reference format"),
        ("a/b/", "invalid reference format"),
        ("-a/b", "invalid reference format"),
        ("a__-b", "invalid reference format"),
        ("a.-b", "invalid reference format"),
        ("host:port/a", "invalid reference format"),
        ("alpine@sha256:abc", "invalid reference format"),
        ("alpine@sha256:" + "a" * 63, "invalid reference format"),
        ("alpine@sha256:" + "A" * 64, "invalid checksum digest format"),
        ("alpine@sha256:" + "a" * 65, "invalid checksum digest length"),
        ("a b", "invalid reference format"),
        ("a" * 64, "cannot specify 64-byte hexadecimal strings"),
        ("ghcr.io/" + "a/" * 130 + "a", "must not be more than 255 characters"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse(text)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_unknown_algorithm_is_not_supported() -> None:
    with pytest.raises(Unsupported, match="unsupported digest algorithm"):
        parse("alpine@md5:" + "a" * 32)


def test_strings() -> None:
    r = parse("alpine:3.20")
    assert str(r) == "docker.io/library/alpine:3.20"
    assert r.familiar() == "alpine:3.20"
    assert r.registry_host == "registry-1.docker.io"
    r2 = parse(f"127.0.0.1:5000/x/y:t@{D}")
    assert str(r2) == f"127.0.0.1:5000/x/y:t@{D}"
    assert r2.familiar() == str(r2)
    assert r2.registry_host == "127.0.0.1:5000"
    assert r2.reference == D
