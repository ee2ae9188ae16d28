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


@pytest.mark.parametrize(
    "spec, tar",
    [
        ("type=oci,dest=out.tar", True),
        ("type=oci,dest=out", False),
        ("type=oci,dest=out,tar=true", True),
        ("type=oci,dest=out.tar,tar=false", False),
    ],
)
def test_oci_output_tar_rule(spec: str, tar: bool) -> None:
    from builder.options import parse_output

    assert parse_output(spec).tar is tar


@pytest.mark.parametrize(
    "spec, attribute",
    [
        ("type=oci,dest=o,push=true", "push"),
        ("type=oci,dest=o,name=example/x", "name"),
        ("type=docker,dest=o.tar,compression=zstd", "compression"),
        ("type=registry,name=localhost:5000/x,oci-mediatypes=true", "oci-mediatypes"),
    ],
)
def test_unknown_output_attributes_are_refused(spec: str, attribute: str) -> None:
    from builder.options import parse_output

    with pytest.raises(Unsupported, match=f"attribute {attribute}= is not supported"):
        parse_output(spec)


@pytest.mark.slow
def test_oci_tar_output_is_a_valid_oci_archive(tmp_path: Path, home: Path) -> None:
    import json

    from util import lbuild, tool

    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /\n")
    out = tmp_path / "img.tar"
    p = lbuild("build", "-o", f"type=oci,dest={out}", tmp_path, home=home)
    assert out.is_file()
    digest = next(w for w in (p.stdout + p.stderr).split() if w.startswith("sha256:"))
    assert json.loads(tool("skopeo", "inspect", f"oci-archive:{out}").stdout)["Digest"] == digest
    p = lbuild("build", "-o", f"type=oci,dest={tmp_path / 'dir.tar'},tar=false", tmp_path, home=home)
    assert (tmp_path / "dir.tar" / "index.json").is_file()
