"""End-to-end: every config instruction (and WORKDIR) through the real CLI, read back from the
image config blob and the unpacked rootfs.

skopeo's ``inspect --config`` drops the Docker extensions (Healthcheck, OnBuild, Shell), so
the config is read straight from the layout's blobs as well.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest
from test_build_copy import D, F, build, fail
from util import write_files

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def raw_config(layout: Path) -> dict[str, Any]:
    """The image config JSON exactly as written (index -> manifest -> config blob)."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    cfg: dict[str, Any] = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    return cfg


@pytest.fixture(scope="module")
def ictx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ictx")
    write_files(root, {"f": "f\n"})
    os.chmod(root / "f", 0o644)
    return root


@pytest.fixture(scope="module")
def ihome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


EVERYTHING = """\
ARG BASE=scratch
ARG VER=1
FROM ${BASE} AS base
ARG VER
ARG LATE=late-default
ENV A=1 B=2
ENV A=3 C="with space"
ENV D=${A}-${VER}-${LATE}
LABEL l1=v1 "l 2"="v 2" ver=$VER
LABEL l1=v1b
USER 1000:${VER}
EXPOSE 80 8000-8002/udp 443/tcp
VOLUME /data
VOLUME ["/v1", "/v2"]
SHELL ["/bin/bash", "-c"]
CMD echo $A
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=1s --retries=2 CMD curl -f http://x/ || exit 1
ONBUILD COPY . /app
WORKDIR /w
WORKDIR rel
WORKDIR /w
COPY f ${D}/
"""


@pytest.fixture(scope="module")
def everything(ictx: Path, ihome: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("work")
    return build(ictx, ihome, work, EVERYTHING, "--build-arg", "VER=7")


def test_env_replace_keeps_place_and_expands_later(everything: Any) -> None:
    cfg = raw_config(everything.layout)["config"]
    assert cfg["Env"] == [DEFAULT_PATH, "A=3", "B=2", "C=with space", "D=3-7-late-default"]


def test_arg_before_and_after_from_with_build_arg(everything: Any) -> None:
    cfg = raw_config(everything.layout)["config"]
    # VER: global default 1, overridden by --build-arg 7, redeclared in the stage;
    # LATE: declared after FROM with its default; USER and LABEL expand ARGs too.
    assert cfg["Labels"] == {"l1": "v1b", "l 2": "v 2", "ver": "7"}
    assert cfg["User"] == "1000:7"


def test_expose_volume_stopsignal(everything: Any) -> None:
    cfg = raw_config(everything.layout)["config"]
    assert cfg["ExposedPorts"] == {
        "80/tcp": {},
        "8000/udp": {},
        "8001/udp": {},
        "8002/udp": {},
        "443/tcp": {},
    }
    assert cfg["Volumes"] == {"/data": {}, "/v1": {}, "/v2": {}}
    assert cfg["StopSignal"] == "SIGTERM"


def test_shell_cmd_healthcheck_onbuild(everything: Any) -> None:
    cfg = raw_config(everything.layout)["config"]
    assert cfg["Shell"] == ["/bin/bash", "-c"]
    assert cfg["Cmd"] == ["/bin/bash", "-c", "echo $A"]
    assert cfg["Healthcheck"] == {
        "Test": ["CMD-SHELL", "curl -f http://x/ || exit 1"],
        "Interval": 5_000_000_000,
        "Timeout": 3_000_000_000,
        "StartPeriod": 1_000_000_000,
        "Retries": 2,
    }
    assert cfg["OnBuild"] == ["COPY . /app"]
    # skopeo sees the OCI part of the same config
    assert everything.config["config"]["Cmd"] == ["/bin/bash", "-c", "echo $A"]


def test_workdir_tree_and_history(everything: Any) -> None:
    # WORKDIR makes each missing level owned by the USER in effect (1000:7), as BuildKit does
    assert everything.tree == {
        "w": D(uid=1000, gid=7),
        "w/rel": D(uid=1000, gid=7),
        "w/3-7-late-default": D(),
        "w/3-7-late-default/f": F("f\n"),
    }
    cfg = raw_config(everything.layout)
    assert cfg["config"]["WorkingDir"] == "/w"
    hist = cfg["history"]
    diff_ids = cfg["rootfs"]["diff_ids"]
    assert len([h for h in hist if not h.get("empty_layer")]) == len(diff_ids) == 3
    by = [(h["created_by"], bool(h.get("empty_layer"))) for h in hist]
    # WORKDIR /w makes /w, WORKDIR rel makes /w/rel, the second WORKDIR /w finds it: no layer
    assert [x for x in by if x[0].startswith("WORKDIR")] == [
        ("WORKDIR /w", False),
        ("WORKDIR rel", False),
        ("WORKDIR /w", True),
    ]
    assert by[-1] == ("COPY f ${D}/", False)
    assert all(e for c, e in by if c.split()[0] in ("ENV", "LABEL", "USER", "EXPOSE", "ARG"))


def test_platform_is_the_hosts(everything: Any) -> None:
    cfg = raw_config(everything.layout)
    m = platform.machine()
    assert cfg["os"] == "linux"
    assert cfg["architecture"] == ARCH.get(m, m)
    index = json.loads((everything.layout / "index.json").read_text())
    assert index["manifests"][0]["platform"] == {"architecture": cfg["architecture"], "os": "linux"}


def test_scratch_defaults(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(ictx, ihome, tmp_path, "FROM scratch\nCOPY f /\n")
    cfg = raw_config(b.layout)["config"]
    assert cfg == {"Env": [DEFAULT_PATH], "WorkingDir": "/"}
    assert b.tree == {"f": F("f\n")}


# (every image here has a layer: oci-image-tool 1.0.0-rc1 insists on one, per image-spec 1.0)
@pytest.mark.slow
def test_cmd_entrypoint_forms(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(
        ictx,
        ihome,
        tmp_path,
        'FROM scratch AS base\nCOPY f /\nENV X=1\nCMD ["exec", "$X"]\n'
        "FROM base AS child\nENTRYPOINT /bin/ep $X\n"
        'FROM base\nCMD run $X\nENTRYPOINT ["/e"]\n',
        "--target",
        "child",
    )
    cfg = raw_config(b.layout)["config"]
    # ENTRYPOINT in a stage that set no CMD resets the inherited CMD; the shell form is
    # wrapped in the default shell; exec forms are never expanded, shell forms not either.
    assert cfg["Entrypoint"] == ["/bin/sh", "-c", "/bin/ep $X"]
    assert "Cmd" not in cfg
    c = build(
        ictx,
        ihome,
        tmp_path,
        'FROM scratch AS base\nCOPY f /\nENV X=1\nCMD ["exec", "$X"]\n'
        'FROM base\nCMD run $X\nENTRYPOINT ["/e"]\n',
    )
    cfg = raw_config(c.layout)["config"]
    # a CMD set in the same stage survives a later ENTRYPOINT
    assert cfg["Entrypoint"] == ["/e"]
    assert cfg["Cmd"] == ["/bin/sh", "-c", "run $X"]
    d = build(ictx, ihome, tmp_path, 'FROM scratch\nCOPY f /\nENV X=1\nCMD ["exec", "$X"]\n')
    assert raw_config(d.layout)["config"]["Cmd"] == ["exec", "$X"]


def test_healthcheck_none_and_exec_form(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(
        ictx,
        ihome,
        tmp_path,
        'FROM scratch AS a\nCOPY f /\nHEALTHCHECK CMD ["/bin/check", "-q"]\n'
        "FROM a\nHEALTHCHECK NONE\n",
        "--target",
        "a",
    )
    assert raw_config(b.layout)["config"]["Healthcheck"] == {"Test": ["CMD", "/bin/check", "-q"]}
    c = build(
        ictx,
        ihome,
        tmp_path,
        'FROM scratch AS a\nCOPY f /\nHEALTHCHECK CMD ["/bin/check", "-q"]\nFROM a\nHEALTHCHECK NONE\n',
    )
    assert raw_config(c.layout)["config"]["Healthcheck"] == {"Test": ["NONE"]}


def test_workdir_on_existing_dir_is_an_empty_layer(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(
        ictx,
        ihome,
        tmp_path,
        "FROM scratch\nCOPY f /app/f\nWORKDIR /app\nWORKDIR sub/../sub2\nWORKDIR /\n",
    )
    cfg = raw_config(b.layout)
    assert [(h["created_by"], bool(h.get("empty_layer"))) for h in cfg["history"]] == [
        ("COPY f /app/f", False),
        ("WORKDIR /app", True),
        ("WORKDIR sub/../sub2", False),
        ("WORKDIR /", True),
    ]
    assert len(cfg["rootfs"]["diff_ids"]) == 2
    assert cfg["config"]["WorkingDir"] == "/"
    assert b.tree == {"app": D(), "app/f": F("f\n"), "app/sub2": D()}


def test_history_includes_base_stage_history(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(
        ictx,
        ihome,
        tmp_path,
        "FROM scratch AS base\nCOPY f /base-f\nLABEL a=b\nFROM base\nCOPY f /child-f\n",
    )
    cfg = raw_config(b.layout)
    assert [h["created_by"] for h in cfg["history"]] == [
        "COPY f /base-f",
        "LABEL a=b",
        "COPY f /child-f",
    ]
    assert len(cfg["rootfs"]["diff_ids"]) == 2
    assert b.tree == {"base-f": F("f\n"), "child-f": F("f\n")}


def test_build_arg_selects_base(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    df = (
        "ARG FLAVOR=one\nFROM scratch AS one\nCOPY f /one\nFROM scratch AS two\nCOPY f /two\n"
        "FROM ${FLAVOR}\nLABEL flavor=${FLAVOR}\n"
    )
    assert build(ictx, ihome, tmp_path, df).tree == {"one": F("f\n")}
    b = build(ictx, ihome, tmp_path, df, "--build-arg", "FLAVOR=two")
    assert b.tree == {"two": F("f\n")}
    # FLAVOR was not declared inside the last stage: LABEL sees it empty, as in Docker
    assert raw_config(b.layout)["config"]["Labels"] == {"flavor": ""}


def test_bad_expose_is_an_error(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    line, df = fail(ictx, ihome, tmp_path, "FROM scratch\nEXPOSE 80/xyz\n")
    assert f"{df}:2:" in line and "xyz" in line


def test_maintainer_is_the_top_level_author(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    b = build(
        ictx, ihome, tmp_path, "FROM scratch\nMAINTAINER first\nCOPY f /\nMAINTAINER Last One\n"
    )
    cfg = raw_config(b.layout)
    assert cfg["author"] == "Last One"
    assert "_author" not in cfg["config"] and "author" not in cfg["config"]


def test_workdir_onto_a_file_fails(ictx: Path, ihome: Path, tmp_path: Path) -> None:
    line, df = fail(ictx, ihome, tmp_path, "FROM scratch\nCOPY f /w\nWORKDIR /w\n")
    assert f"{df}:3:" in line and "not a directory" in line
