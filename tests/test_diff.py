"""``lbuild diff``: hand-made OCI layouts and docker archives that differ in one known way each,
compared through the real command line (exit 0 equal, 1 different, 2 bad input)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard
from registry_server import (
    Registry,
    registry_fixture,  # noqa: F401 (a fixture)
    unique_repo,
)
from util import lbuild, tool

# ---------------------------------------------------------------------------------------------
# A tiny image writer (tarfile + json), so every header field is under the test's control.


@dataclass
class F:
    """One tar member."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mtime: int = 0
    link: str = ""
    pax: dict[str, str] = field(default_factory=dict)


def layer_tar(members: list[F]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type, ti.mode, ti.uid, ti.gid = m.type, m.mode, m.uid, m.gid
            ti.uname, ti.gname, ti.mtime, ti.linkname = m.uname, m.gname, m.mtime, m.link
            ti.pax_headers = dict(m.pax)
            if m.type == tarfile.REGTYPE:
                ti.size = len(m.data)
                tar.addfile(ti, io.BytesIO(m.data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(layout: Path, data: bytes) -> str:
    d = sha(data)
    (layout / "blobs" / "sha256" / d[7:]).write_bytes(data)
    return d


BASE = [F("etc", type=tarfile.DIRTYPE, mode=0o755), F("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")]


def make_layout(
    layout: Path,
    layers: list[list[F]],
    *,
    config: dict[str, Any] | None = None,
    compression: str = "gzip",
    tag: str = "latest",
) -> Path:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descs, diff_ids = [], []
    for members in layers:
        plain = layer_tar(members)
        diff_ids.append(sha(plain))
        if compression == "gzip":
            blob, media = gzip.compress(plain, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        elif compression == "zstd":
            blob = zstandard.ZstdCompressor().compress(plain)
            media = "application/vnd.oci.image.layer.v1.tar+zstd"
        else:
            blob, media = plain, "application/vnd.oci.image.layer.v1.tar"
        descs.append({"mediaType": media, "digest": put(layout, blob), "size": len(blob)})
    cfg: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin", "A=1"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"step {i}"} for i in range(len(layers))],
    }
    cfg.update(config or {})
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(layout, cfg_bytes), "size": len(cfg_bytes)},
        "layers": descs,
    }
    mbytes = json.dumps(manifest, sort_keys=True).encode()
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(layout, mbytes),
        "size": len(mbytes),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })
    index_path.write_text(json.dumps(index))
    return layout


def diff(home: Path, *args: str | Path) -> tuple[int, Any]:
    p = lbuild("diff", "--format", "json", *args, home=home, check=False)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def changed(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> {attribute: [a, b]} over every layer."""
    res: dict[str, dict[str, Any]] = {}
    for layer in out["layers"]:
        for f in layer["files"]:
            res[f["path"]] = f.get("changes", {}) | {"status": f["status"]}
    return res


APP = [
    F("app", type=tarfile.DIRTYPE, mode=0o755),
    F("app/a.txt", b"alpha\n"),
    F("app/b.sh", b"#!/bin/sh\n", mode=0o755),
    F("app/link", type=tarfile.SYMTYPE, link="a.txt", mode=0o777),
    F("app/owned", b"x", uid=1000, gid=1000, uname="dev", gname="dev"),
]


def test_identical_images_are_equal(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [BASE, APP])
    b = make_layout(tmp_path / "b", [BASE, APP])
    code, out = diff(home, a, b)
    assert code == 0 and out["equal"] is True
    assert out["a"]["manifest"] == out["b"]["manifest"]
    p = lbuild("diff", a, f"oci-layout://{b}:latest", home=home, check=False)
    assert p.returncode == 0 and "images are equal" in p.stdout


def test_every_file_attribute_is_named(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [BASE, APP])
    other = [
        F("app", type=tarfile.DIRTYPE, mode=0o755),
        F("app/a.txt", b"ALPHA\n", mtime=5),  # content, mtime
        F("app/b.sh", b"#!/bin/sh\n", mode=0o700),  # mode
        F("app/link", type=tarfile.SYMTYPE, link="b.sh", mode=0o777),  # link target
        F("app/owned", b"x", uid=1001, gid=1000, uname="ops", gname="dev"),  # uid, uname
        F("app/new", b"n"),  # added
    ]
    b = make_layout(tmp_path / "b", [BASE, other])
    code, out = diff(home, a, b)
    assert code == 1 and out["equal"] is False
    files = changed(out)
    assert files["app/a.txt"] == {"status": "changed", "content": [files["app/a.txt"]["content"][0], files["app/a.txt"]["content"][1]], "mtime": [0, 5]}
    assert files["app/b.sh"] == {"status": "changed", "mode": ["0755", "0700"]}
    assert files["app/link"] == {"status": "changed", "link": ["a.txt", "b.sh"]}
    assert files["app/owned"] == {"status": "changed", "uid": [1000, 1001], "uname": ["dev", "ops"]}
    assert files["app/new"] == {"status": "added"}
    assert set(files) == {"app/a.txt", "app/b.sh", "app/link", "app/owned", "app/new"}
    assert [layer["index"] for layer in out["layers"]] == [1]  # the base layer is equal


def test_removed_file_xattrs_pax_and_typeflag(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [[
        F("x", b"1", pax={"SCHILY.xattr.user.k": "v1"}),
        F("y", b"2"),
        F("z", b"", pax={"comment": "hello"}),
        F("d", type=tarfile.DIRTYPE, mode=0o755),
    ]])
    b = make_layout(tmp_path / "b", [[
        F("x", b"1", pax={"SCHILY.xattr.user.k": "v2"}),
        F("z", b"", pax={"comment": "bye"}),
        F("d", type=tarfile.FIFOTYPE, mode=0o755),
    ]])
    code, out = diff(home, a, b)
    files = changed(out)
    assert code == 1
    assert files["x"] == {"status": "changed", "xattrs": [{"user.k": "v1"}, {"user.k": "v2"}]}
    assert files["y"] == {"status": "removed"}
    assert files["z"] == {"status": "changed", "pax": [{"comment": "hello"}, {"comment": "bye"}]}
    assert files["d"] == {"status": "changed", "typeflag": ["5", "6"]}


def test_entry_order_is_a_difference(tmp_path: Path, home: Path) -> None:
    members = [F("a", b"1"), F("b", b"2"), F("c", b"3")]
    a = make_layout(tmp_path / "a", [members])
    b = make_layout(tmp_path / "b", [[members[0], members[2], members[1]]])
    code, out = diff(home, a, b)
    assert code == 1
    (layer,) = out["layers"]
    assert layer["files"] == []
    assert layer["order"]["first"] == "b" and layer["order"]["b_has_there"] == "c"
    text = lbuild("diff", a, b, home=home, check=False).stdout
    assert "entry order differs: b is entry 1 in A, 2 in B" in text


def test_config_fields_and_ignore_options(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [[F("f", b"1", mtime=100)]])
    b = make_layout(
        tmp_path / "b",
        [[F("f", b"1", mtime=200)]],
        config={
            "created": "2024-01-01T00:00:00Z",
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "step 0"}],
        },
    )
    code, out = diff(home, a, b)
    assert code == 1
    fields = {f["field"]: (f["a"], f["b"]) for f in out["config"]}
    assert fields == {
        "created": ("1970-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
        "history[0].created": ("1970-01-01T00:00:00Z", "2024-01-01T00:00:00Z"),
    }
    assert changed(out)["f"] == {"status": "changed", "mtime": [100, 200]}
    code, out = diff(home, "--ignore-timestamps", a, b)
    assert code == 0 and out["equal"] is True and out["config"] == []
    c = make_layout(
        tmp_path / "c",
        [[F("f", b"1", mtime=100)]],
        config={"history": [{"created": "1970-01-01T00:00:00Z", "created_by": "other"}],
                "config": {"Env": ["PATH=/bin", "A=2"], "Cmd": ["/bin/sh"]}},
    )
    code, out = diff(home, "--ignore-history", a, c)
    assert code == 1
    assert [(f["field"], f["a"], f["b"]) for f in out["config"]] == [("config.Env[1]", "A=1", "A=2")]


def test_compression_differs_content_equal(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [BASE, APP], compression="gzip")
    b = make_layout(tmp_path / "b", [BASE, APP], compression="zstd")
    c = make_layout(tmp_path / "c", [BASE, APP], compression="none")
    code, out = diff(home, a, b)
    assert code == 1
    for layer in out["layers"]:
        names = {f["field"] for f in layer["fields"]}
        assert "mediaType" in names and "diff_id" not in names and layer["files"] == []
    code, out = diff(home, b, c)
    assert code == 1 and len(out["layers"]) == 2


def test_docker_archive_against_layout(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [BASE, APP])
    # the same image as a docker-archive (what `docker save` writes)
    idx = json.loads((a / "index.json").read_text())
    manifest = json.loads((a / "blobs" / "sha256" / idx["manifests"][0]["digest"][7:]).read_bytes())
    cfg = (a / "blobs" / "sha256" / manifest["config"]["digest"][7:]).read_bytes()
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tar:
        names = []
        for i, members in enumerate([BASE, APP]):
            data = layer_tar(members)
            ti = tarfile.TarInfo(f"{i}/layer.tar")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
            names.append(ti.name)
        for name, data in (("config.json", cfg), ("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": names}]).encode())):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    code, out = diff(home, a, archive)
    assert code == 0, out
    assert out["b"]["kind"] == "docker-archive"
    code, _ = diff(home, a, f"docker-archive:{archive}:x:1")
    assert code == 0


def test_bad_input_is_one_line_exit_2(tmp_path: Path, home: Path) -> None:
    a = make_layout(tmp_path / "a", [BASE])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (broken / "index.json").write_text("{not json")
    missing_blob = make_layout(tmp_path / "mb", [BASE])
    for blob in (missing_blob / "blobs" / "sha256").iterdir():
        if blob.stat().st_size > 200:
            blob.unlink()
    cases = {
        "missing image": (tmp_path / "nope", "no such OCI layout"),
        "no such tag": (f"{a}:v9", "no image tagged 'v9'"),
        "unreadable layout": (broken, "invalid JSON"),
        "not a layout": (tmp_path, "not an OCI image layout"),
        "unknown local tag": ("never-built:1", "not found"),
        "missing blob": (missing_blob, "missing"),
    }
    for what, (ref, message) in cases.items():
        p = lbuild("diff", a, ref, home=home, check=False)
        assert p.returncode == 2, (what, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (what, p.stderr)
        assert "Traceback" not in p.stderr


def test_local_tag_against_its_export(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("hello\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY f /f\nENV A=1\n")
    out = tmp_path / "out"
    lbuild("build", ctx, "-t", "mine:1", "-o", f"type=oci,dest={out}", "-o", f"type=docker,dest={tmp_path / 'd.tar'}", home=home)
    code, res = diff(home, "mine:1", out)
    assert code == 0 and res["a"]["kind"] == "local"
    code, res = diff(home, "mine:1", tmp_path / "d.tar")
    assert code == 0, res
    (ctx / "f").write_text("changed\n")
    lbuild("build", ctx, "-t", "mine:2", home=home)
    code, res = diff(home, "mine:1", "mine:2")
    assert code == 1 and set(changed(res)) == {"f"}


def test_registry_reference(
    tmp_path: Path, home: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LBUILD_OFFLINE", raising=False)  # conftest keeps other tests offline
    a = make_layout(tmp_path / "a", [BASE, APP])
    repo = f"{registry.host}/{unique_repo()}"
    tool("skopeo", "copy", *registry.skopeo_flags("dest"), f"oci:{a}:latest", f"docker://{repo}:1")
    code, out = diff(home, f"docker://{repo}:1", a)
    assert code == 0 and out["a"]["kind"] == "local", out
    assert out["a"]["manifest"] == out["b"]["manifest"]  # skopeo kept the manifest bytes
    code, out = diff(home, f"{repo}:1", make_layout(tmp_path / "b", [BASE]))
    assert code == 1 and [layer["index"] for layer in out["layers"]] == [1]
