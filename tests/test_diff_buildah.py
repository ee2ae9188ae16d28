"""``lbuild diff`` of a buildah image and an lbuild image of the same Dockerfile reports exactly
the differences known between the two builders (PEERS.md) and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import needs_root
from util import lbuild, tool

busybox_home = run_fixtures.busybox_home
pytestmark = [
    needs_root,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah"),
]

DOCKERFILE = """\
FROM {base}
ENV GREETING=hi
COPY hello.txt /app/hello.txt
COPY dir /app/dir
RUN echo built > /app/built
"""


def test_buildah_and_lbuild_differ_only_as_known(
    busybox_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    # the busybox image as an OCI layout, then into buildah's private storage
    from builder.compare.local import LocalStore

    with LocalStore(busybox_home) as store:
        assert store.export_base("busybox:test", base)
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path}/graph"\nrunroot = "{tmp_path}/run"\n')
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(conf))
    try:
        tool("skopeo", "copy", f"oci:{base}:latest", "containers-storage:localhost/busybox:test")
        ctx = tmp_path / "ctx"
        (ctx / "dir").mkdir(parents=True)
        (ctx / "hello.txt").write_text("hello\n")
        (ctx / "dir" / "x").write_text("x\n")
        (ctx / "Dockerfile").write_text(DOCKERFILE.format(base="localhost/busybox:test"))
        (ctx / "l.Dockerfile").write_text(DOCKERFILE.format(base="busybox:test"))
        tool("buildah", "bud", "--isolation", "chroot", "--pull=never", "--format", "oci",
             "--layers", "--timestamp", "0", "-f", ctx / "Dockerfile", "--iidfile",
             tmp_path / "iid", "-t", "localhost/out:latest", ctx)
        iid = (tmp_path / "iid").read_text().strip()
        tool("buildah", "push", "--format", "oci", iid, f"oci:{tmp_path / 'theirs'}:latest")
    finally:
        tool("buildah", "rm", "--all", check=False)
        tool("buildah", "rmi", "--all", "--force", check=False)  # unmounts its overlay layers
    lbuild("build", "-f", ctx / "l.Dockerfile", ctx, "-o", f"type=oci,dest={tmp_path / 'ours'}",
           home=busybox_home, env={"SOURCE_DATE_EPOCH": "0"})
    p = lbuild("diff", "--format", "json", tmp_path / "theirs", tmp_path / "ours",
               home=busybox_home, check=False)
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    # manifest: buildah annotates the base image; the config digest follows from the config
    assert {f["field"].split(".")[0] for f in out["manifest"] if not f.get("derived")} == {"annotations"}
    # config: buildah's label, and the history text of the four steps lbuild built
    fields = {f["field"] for f in out["config"]}
    assert fields == {"config.Labels"} | {f"history[{i}].{k}" for i in (3, 4, 5, 6)
                                          for k in ("comment", "created_by")}
    created_by = {f["field"]: f["b"] for f in out["config"] if f["field"].endswith("created_by")}
    assert created_by["history[6].created_by"] == "RUN echo built > /app/built"
    layers = {layer["index"]: layer for layer in out["layers"]}
    assert sorted(layers) == [0, 1, 2, 3, 4, 5]
    for i in (0, 1, 2):  # base layers: recompressed by buildah push, same content
        assert {f["field"] for f in layers[i]["fields"]} == {"digest", "size"}
    for i in (3, 4):  # COPY: the same entries, tar headers written differently
        assert layers[i]["files"] == [] and layers[i]["order"] is None
        assert "tar bytes" in {f["field"] for f in layers[i]["fields"]}
    # RUN: buildah's layer also carries the mount points and the files it bind-mounts
    assert {(f["path"], f["status"]) for f in layers[5]["files"]} == {
        (p, "removed") for p in ("dev", "etc", "etc/hostname", "etc/hosts", "etc/resolv.conf",
                                 "proc", "run", "sys")
    }
    # under --ignore-history the history texts are gone, everything else stays
    p = lbuild("diff", "--format", "json", "--ignore-history", tmp_path / "theirs",
               tmp_path / "ours", home=busybox_home, check=False)
    assert {f["field"] for f in json.loads(p.stdout)["config"]} == {"config.Labels"}
