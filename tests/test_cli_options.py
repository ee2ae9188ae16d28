"""Command-line values lbuild does not implement are refused, naming what (issue 9 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.solve.run import secrets_from
from cache.errors import InvalidInput, Unsupported


def test_secret_known_keys(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("x")
    assert secrets_from([f"id=a,src={f}", f"type=file,id=b,source={f}"]) == {"a": f, "b": f}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("id=a,src={f},mode=0400", "unexpected key 'mode'"),
        ("id=a,src={f},required", "field 'required' must be a key=value pair"),
        ("id=a,src={f},type=ssh", "unsupported secret type 'ssh'"),
        ("src={f}", "id= is required"),
    ],
)
def test_secret_bad_fields_are_refused(tmp_path: Path, spec: str, message: str) -> None:
    f = tmp_path / "s"
    f.write_text("x")
    with pytest.raises(InvalidInput, match=message):
        secrets_from([spec.format(f=f)])


def test_env_secret_not_supported_yet() -> None:
    with pytest.raises(Unsupported, match="environment secrets are not supported yet"):
        secrets_from(["id=a,env=HOME"])
    with pytest.raises(Unsupported):
        secrets_from(["id=a,type=env"])


def test_dockerignore_inverted_class_range_is_refused() -> None:
    # moby/patternmatcher compiles classes with Go's regexp, which rejects `l-O`: Docker fails
    # the build; COPY wildcards (filepath.Match) accept it and match nothing.
    from builder.frontend.dockerignore import compile_segment, parse_dockerignore

    with pytest.raises(InvalidInput, match=r"\.dockerignore:2: bad \.dockerignore pattern "
                       r"'\[Local-Only\]': invalid character class range: `l-O`"):
        parse_dockerignore("ok\n[Local-Only]/\n", source=".dockerignore")
    assert parse_dockerignore("[a-c]x\n").excluded("bx")
    assert compile_segment("[Local-Only]").fullmatch("L")
    assert not compile_segment("[l-O]").fullmatch("m")


def test_platform_normalised_as_containerd_does() -> None:
    from cache.platform import can_run, host_platform, parse_platform

    _os, arch, _variant = host_platform()
    assert parse_platform("linux") == ("linux", arch, _variant)
    assert parse_platform("Linux/aarch64/v8") == ("linux", "arm64", "")
    assert parse_platform("linux/x86_64") == ("linux", "amd64", "")
    assert can_run(f"linux/{arch}")
    assert not can_run("linux/s390x" if arch != "s390x" else "linux/amd64")
    assert not can_run(f"windows/{arch}")
    with pytest.raises(ValueError):
        parse_platform("linux//v7")


def test_from_platform_the_host_cannot_run_is_exit_2(tmp_path: Path, home: Path) -> None:
    from util import lbuild

    from cache.platform import host_platform

    other = "linux/s390x" if host_platform()[1] != "s390x" else "linux/amd64"
    (tmp_path / "Dockerfile").write_text(
        f"FROM scratch AS ok\nFROM --platform=$BUILDPLATFORM scratch\nFROM --platform={other} scratch\n"
    )
    p = lbuild("build", tmp_path, home=home, check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == (
        f"lbuild: error: {tmp_path}/Dockerfile:3: FROM --platform={other}: building for a "
        f"platform other than this host's (linux/{host_platform()[1]}) is not supported yet"
    )
