"""End to end: builds FROM a registry image, pushes, `lbuild pull` / `lbuild push`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from registry_server import (
    FaultProxy,
    Registry,
    add_image,
    put_image,
    registry_fixture,  # noqa: F401 (a fixture)
    skopeo_copy,
    unique_repo,
    write_layout,
)
from util import lbuild

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests reach loopback registries (conftest makes every other test offline)."""
    monkeypatch.delenv("LBUILD_OFFLINE", raising=False)



def base_layout(tmp: Path, *, shell: bool = False) -> Path:
    lay = tmp / "base"
    layers = [{"etc/base": b"base\n"}, {"usr/share/x": b"x" * 2000}]
    if shell:
        layers.append({"bin/busybox": Path("/bin/busybox").read_bytes(),
                       "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
                       "etc/group": b"root:x:0:\n"})
    write_layout(lay, add_image(lay, layers, env=["PATH=/usr/bin:/bin", "FROM_BASE=1"]))
    return lay


def context(tmp: Path, from_line: str, *, run: bool = False) -> Path:
    ctx = tmp / f"ctx-{abs(hash(from_line)) % 10**8}"
    ctx.mkdir()
    (ctx / "app.txt").write_text("hello\n")
    extra = '\nRUN ["/bin/busybox", "sh", "-c", "cat /etc/base /app/app.txt > /built"]' if run else ""
    (ctx / "Dockerfile").write_text(f"{from_line}\nCOPY app.txt /app/\nENV APP=1{extra}\n")
    return ctx


def layout_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def test_from_registry_equals_from_oci_layout_and_push(registry: Registry, tmp_path: Path) -> None:
    lay = base_layout(tmp_path, shell=True)
    base_ref = put_image(registry, lay, unique_repo("base"))
    ctx = context(tmp_path, f"FROM {base_ref}", run=True)
    out1 = tmp_path / "out1"
    target = f"{registry.host}/{unique_repo('app')}:v1"
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}  # RUN's file times clamped: comparable
    p = lbuild("build", "-t", target, "--push", "--output", f"type=oci,dest={out1}",
               "--progress", "json", ctx, home=tmp_path / "h1", env=epoch)
    events = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    done = events[-1]
    assert done["event"] == "done"
    digest = layout_digest(out1)
    assert done["digest"] == digest and done["pushed"] == [f"{target}@{digest}"]
    assert any(e["event"] == "pull" and e["done"] == e["total"] for e in events)
    assert any(e["event"] == "push" and e["done"] == e["total"] for e in events)
    # the same build from the OCI layout of that image gives the same image
    ctx2 = context(tmp_path, "FROM base", run=True)
    out2 = tmp_path / "out2"
    lbuild("build", "--build-context", f"base=oci-layout://{lay}:latest", "--output",
           f"type=oci,dest={out2}", ctx2, home=tmp_path / "h2", env=epoch)
    assert layout_digest(out2) == digest
    # what the registry holds is those bytes, and skopeo can copy it back
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{target}"], capture_output=True, check=True).stdout
    assert raw == (out1 / "blobs" / "sha256" / digest[7:]).read_bytes()
    back = tmp_path / "back"
    skopeo_copy(f"docker://{target}", f"oci:{back}:latest", "--src-tls-verify=false")
    assert layout_digest(back) == digest
    # --output type=registry with two names; the base layers are mounted or present
    t2, t3 = (f"{registry.host}/{unique_repo('out')}:x" for _ in range(2))
    p = lbuild("build", "--output", f"type=registry,name={t2},name={t3}", ctx,
               home=tmp_path / "h1", env=epoch)
    assert f"{t2}@{digest}" in p.stderr + p.stdout and f"{t3}@{digest}" in p.stderr + p.stdout


def test_tag_is_resolved_once_and_pull_heads(registry: Registry, tmp_path: Path) -> None:
    lay = base_layout(tmp_path)
    repo = unique_repo("base")
    put_image(registry, lay, repo)
    proxy = FaultProxy(registry.host).start()
    try:
        ref = f"{proxy.host}/{repo}:latest"
        ctx = context(tmp_path, f"FROM {ref}")
        home = tmp_path / "home"
        lbuild("build", ctx, home=home)
        first = len(proxy.log)
        assert first >= 4  # manifest, config, two layers
        (ctx / "app.txt").write_text("changed\n")  # not a no-op: the plan resolves FROM again
        lbuild("build", ctx, home=home)
        assert len(proxy.log) == first  # the tag is remembered: no request
        lbuild("build", "--pull", ctx, home=home)
        assert [(m, "/manifests/" in p) for m, p, _ in proxy.log[first:]] == [("HEAD", True)]
        p = lbuild("pull", ref, home=home)
        assert "up to date" in p.stdout
        # lbuild push of the pulled image to another repository
        target = f"{registry.host}/{unique_repo('copy')}:1"
        p = lbuild("push", ref, target, home=home)
        assert p.stdout.strip().startswith(f"{target}@sha256:")
    finally:
        proxy.stop()


def test_errors_exit_codes(registry: Registry, tmp_path: Path) -> None:
    ctx = context(tmp_path, "FROM Bad/Name:latest")
    p = lbuild("build", ctx, home=tmp_path / "h", check=False)
    assert p.returncode == 2 and "invalid reference format" in p.stderr
    ctx = context(tmp_path, f"FROM {registry.host}/no/such:tag")
    p = lbuild("build", ctx, home=tmp_path / "h", check=False)
    assert p.returncode == 1 and "manifest unknown" in p.stderr
    p = lbuild("pull", "UPPER", home=tmp_path / "h", check=False)
    assert p.returncode == 2 and "must be lowercase" in p.stderr
    p = lbuild("push", "nothing-here", f"{registry.host}/x/y", home=tmp_path / "h", check=False)
    assert p.returncode == 2 and "no image" in p.stderr
    p = lbuild("build", "--output", "type=registry", ctx, home=tmp_path / "h", check=False)
    assert p.returncode == 2 and "name=" in p.stderr


def test_offline_build_never_asks_the_registry(registry: Registry, tmp_path: Path) -> None:
    """What lbuild watch does without --pull: a remembered tag works, an unknown one fails."""
    from builder.api import build
    from builder.options import BuildOptions
    from cache.errors import NotFound

    lay = base_layout(tmp_path)
    repo = unique_repo("base")
    put_image(registry, lay, repo)
    proxy = FaultProxy(registry.host).start()
    try:
        ctx = context(tmp_path, f"FROM {proxy.host}/{repo}:latest")
        home = tmp_path / "home"
        with pytest.raises(NotFound) as err:
            build(BuildOptions(ctx, home=home, offline=True), writer="inline")
        assert "no registry is asked" in str(err.value) and err.value.exit_code == 2
        assert proxy.log == []
        lbuild("pull", f"{proxy.host}/{repo}:latest", home=home)
        pulled = len(proxy.log)
        result = build(BuildOptions(ctx, home=home, offline=True, no_cache=True), writer="inline")
        assert result.steps_total == 2 and len(proxy.log) == pulled
        # --pull in watch (offline=False, pull=True): exactly one HEAD
        build(BuildOptions(ctx, home=home, pull=True, no_cache=True), writer="inline")
        assert [m for m, _, _ in proxy.log[pulled:]] == ["HEAD"]
    finally:
        proxy.stop()
