"""Sharing the cache: ``--cache-to``/``--cache-from`` (type=local and type=registry),
``lbuild warm``, ``lbuild cache export|import`` (issue 13).

Every build here is real: a home A warms, an empty home B builds a copy of the context at
another path, and the images are compared by manifest digest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from registry_server import (
    FaultProxy,
    Registry,
    add_image,
    free_port,
    registry_fixture,  # noqa: F401 (a fixture)
    unique_repo,
    write_layout,
)
from util import lbuild, manifest_digest

pytestmark = pytest.mark.slow
EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}  # RUN's file times clamped: builds comparable

DOCKERFILE = """\
FROM scratch AS tool
COPY tool.txt /tool.txt

FROM base AS app
COPY a.txt /a.txt
RUN ["/bin/busybox", "sh", "-c", "cat /a.txt /etc/base > /built"]
COPY --from=tool /tool.txt /t
ENV X=1
"""


def base_layout(tmp: Path) -> Path:
    lay = tmp / "base"
    layers = [
        {"etc/base": b"base\n"},
        {
            "bin/busybox": Path("/bin/busybox").read_bytes(),
            "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
            "etc/group": b"root:x:0:\n",
        },
    ]
    write_layout(lay, add_image(lay, layers, env=["PATH=/bin"]))
    return lay


def context(tmp: Path, name: str, dockerfile: str = DOCKERFILE) -> Path:
    ctx = tmp / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / "a.txt").write_text("a\n")
    (ctx / "tool.txt").write_text("tool\n")
    return ctx


def build(ctx: Path, home: Path, base: Path, out: Path, *flags: str) -> list[dict[str, object]]:
    p = lbuild("build", ctx, "--build-context", f"base=oci-layout://{base}", "--progress",
               "json", "--output", f"type=oci,dest={out}", *flags, home=home, env=EPOCH)
    return [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]


def cached(events: list[dict[str, object]]) -> dict[str, bool]:
    return {str(e["name"]): bool(e["cached"]) for e in events if e.get("event") == "step_done"}


def diff_ids(layout: Path) -> list[str]:
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    cfg = json.loads((layout / "blobs/sha256" / man["config"]["digest"][7:]).read_text())
    return list(cfg["rootfs"]["diff_ids"])


def in_store(home: Path, digest: str) -> bool:
    return (home / "blobs/sha256" / digest.split(":")[1]).is_file()


def test_local_cache_max_makes_a_cold_home_hot_from_another_path(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    a = build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
              "--cache-to", f"type=local,dest={cache},mode=max")
    assert not any(cached(a).values())
    b = build(context(tmp_path, "p2"), tmp_path / "hB", base, tmp_path / "outB",
              "--cache-from", f"type=local,src={cache}")
    assert cached(b) and all(cached(b).values()), cached(b)
    assert manifest_digest(tmp_path / "outB") == manifest_digest(tmp_path / "outA")
    # lazy: the OCI output needs compressed blobs only, so none of the app's layer tars was
    # fetched and unpacked (the base's two come from its --build-context layout)
    app_layers = diff_ids(tmp_path / "outB")[2:]
    assert len(app_layers) == 3
    assert not [d for d in app_layers if in_store(tmp_path / "hB", d)]


def test_mode_min_carries_only_the_image_s_stages(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache}")  # mode=min is the default
    b = cached(build(context(tmp_path, "p2"), tmp_path / "hB", base, tmp_path / "outB",
                     "--cache-from", f"type=local,src={cache}"))
    assert b["[tool 1/1] COPY tool.txt /tool.txt"] is False  # the COPY --from stage: not exported
    assert all(v for k, v in b.items() if k.startswith("[app"))
    assert manifest_digest(tmp_path / "outB") == manifest_digest(tmp_path / "outA")


def test_a_run_below_imported_steps_fetches_the_parent_chain(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache},mode=max")
    more = DOCKERFILE + 'RUN ["/bin/busybox", "sh", "-c", "cat /built /t > /again"]\n'
    b = cached(build(context(tmp_path, "p2", more), tmp_path / "hB", base, tmp_path / "outB",
                     "--cache-from", f"type=local,src={cache}"))
    assert [k for k, v in b.items() if not v] == ['[app 5/5] RUN ["/bin/busybox", "sh", "-c", "cat /built /t > /again"]']
    cold = build(context(tmp_path, "p3", more), tmp_path / "hC", base, tmp_path / "outC")
    assert not any(cached(cold).values())
    assert manifest_digest(tmp_path / "outB") == manifest_digest(tmp_path / "outC")


def _layer_blobs(cache: Path) -> list[Path]:
    idx = json.loads((cache / "index.json").read_text())
    man = json.loads((cache / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    return [cache / "blobs/sha256" / d["digest"][7:] for d in man["layers"]
            if d["mediaType"].endswith("tar+gzip")]


@pytest.mark.parametrize("damage", ["flipped-layer", "truncated-records", "foreign", "missing"])
def test_a_damaged_or_foreign_cache_is_a_warning_and_a_correct_build(
    tmp_path: Path, damage: str
) -> None:
    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache},mode=max")
    if damage == "flipped-layer":
        for blob in _layer_blobs(cache):
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.chmod(0o644)
            blob.write_bytes(bytes(data))
    elif damage == "truncated-records":
        idx = json.loads((cache / "index.json").read_text())
        man = json.loads((cache / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
        rec = cache / "blobs/sha256" / man["config"]["digest"][7:]
        rec.chmod(0o644)
        rec.write_bytes(rec.read_bytes()[:40])
    elif damage == "foreign":
        shutil.rmtree(cache)
        shutil.copytree(base, cache)  # an ordinary image, not an lbuild cache
    else:
        shutil.rmtree(cache)
    p = lbuild("build", context(tmp_path, "p2"), "--build-context", f"base=oci-layout://{base}",
               "--progress", "plain", "--output", f"type=oci,dest={tmp_path / 'outB'}",
               "--cache-from", f"type=local,src={cache}", home=tmp_path / "hB", env=EPOCH)
    assert "warning" in p.stderr
    assert manifest_digest(tmp_path / "outB") == manifest_digest(tmp_path / "outA")


def test_a_shared_blob_that_proved_unusable_stays_unusable(tmp_path: Path) -> None:
    # the layers are fetched on threads (all at once for the image): the first fetch of a
    # corrupt blob marks it; any later ask must raise again, never answer "not there" (the
    # build then said "blob ... is not in the store" and exited 2 instead of rebuilding)
    from cache.remote.remote import RemoteCache, UnusableSharedBlob
    from cache.remote.spec import CacheSpec
    from cache.store.blobs import BlobStore

    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache},mode=max")
    blob = _layer_blobs(cache)[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    warnings: list[str] = []
    store = BlobStore(tmp_path / "hB")
    remote = RemoteCache.open([CacheSpec("local", str(cache))], store, warnings.append)
    digest = f"sha256:{blob.name}"
    for _ in range(2):
        with pytest.raises(UnusableSharedBlob):
            remote.prefetch([digest])
    assert not store.has(digest)  # type: ignore[arg-type]
    assert len(warnings) == 1 and digest in warnings[0]


def test_a_failing_cache_to_fails_the_build_unless_ignore_error(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    args = ("build", context(tmp_path, "p1"), "--build-context", f"base=oci-layout://{base}",
            "--progress", "plain")
    p = lbuild(*args, "--cache-to", f"type=local,dest={blocked / 'c'}", home=tmp_path / "h",
               env=EPOCH, check=False)
    assert p.returncode == 1 and "--cache-to" in p.stderr.strip().splitlines()[-1]
    p = lbuild(*args, "--cache-to", f"type=local,dest={blocked / 'c'},ignore-error=true",
               home=tmp_path / "h", env=EPOCH)
    assert "ignore-error=true" in p.stderr


@pytest.mark.parametrize("flag", ["type=local,dest=/x,compression=zstd", "type=gha",
                                  "type=local,dest=/x,bogus=1", "type=local"])
def test_cache_flags_lbuild_does_not_implement_are_exit_2(tmp_path: Path, flag: str) -> None:
    p = lbuild("build", tmp_path, "--cache-to", flag, home=tmp_path / "h", check=False)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "--cache-to" in p.stderr


def test_a_build_that_fails_while_planning_says_its_own_error(tmp_path: Path) -> None:
    # the sources are read on a thread while the build plans: a Dockerfile error is still the
    # one line said, and an unreachable cache is not waited for
    ctx = context(tmp_path, "p1", "FROM scratch\nBOGUS x\n")
    dead = f"127.0.0.1:{free_port()}"
    p = lbuild("build", ctx, "--cache-from", f"type=registry,ref={dead}/c:main",
               home=tmp_path / "h", check=False)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"lbuild: error: {ctx / 'Dockerfile'}:2: unknown instruction: BOGUS"]


def test_registry_cache_and_warm_with_a_matrix(registry: Registry, tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    ctx = context(tmp_path, "p1", DOCKERFILE.replace("ENV X=1", "ARG V=0\nENV X=$V"))
    matrix = tmp_path / "matrix.json"
    matrix.write_text(json.dumps([{"V": "1"}, {"V": "2"}]))
    ref = f"{registry.host}/{unique_repo('cache')}:main"
    p = lbuild("warm", ctx, "--build-context", f"base=oci-layout://{base}", "--target", "tool",
               "--target", "app", "--matrix", matrix, "--cache-to", f"type=registry,ref={ref}",
               "--progress", "json", home=tmp_path / "hA", env=EPOCH)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["ok"]
    assert [(b["target"], b["build_args"]) for b in summary["builds"]] == [
        ("tool", {"V": "1"}), ("app", {"V": "1"}), ("tool", {"V": "2"}), ("app", {"V": "2"})]
    # tool once; app's COPY, RUN, COPY --from once; ENV X=$V (with its ARG) per value
    assert summary["steps_built"] == 1 + 5 + 2 and summary["exports"][0]["blobs_uploaded"] > 0
    for v in ("1", "2"):
        out = tmp_path / f"out{v}"
        b = cached(build(shutil.copytree(ctx, tmp_path / f"copy{v}"), tmp_path / "hB", base, out,
                         "--build-arg", f"V={v}", "--cache-from", f"type=registry,ref={ref}"))
        assert b and all(b.values()), b
        cold = tmp_path / f"cold{v}"
        build(ctx, tmp_path / f"hC{v}", base, cold, "--build-arg", f"V={v}")
        assert manifest_digest(out) == manifest_digest(cold)


def test_cache_export_and_import_move_the_whole_index(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA")
    dest = tmp_path / "exported"
    p = lbuild("cache", "export", "--to", f"type=local,dest={dest}", home=tmp_path / "hA")
    assert p.stdout.startswith("exported ")
    p = lbuild("cache", "import", "--from", f"type=local,src={dest}", home=tmp_path / "hB")
    assert p.stdout.startswith("imported ") and "skipped" not in p.stdout
    # the imported index answers every step without any --cache-from
    b = cached(build(context(tmp_path, "p2"), tmp_path / "hB", base, tmp_path / "outB"))
    assert b and all(b.values()), b
    assert manifest_digest(tmp_path / "outB") == manifest_digest(tmp_path / "outA")


def _warm_registry_cache(registry: Registry, tmp_path: Path) -> tuple[Path, str]:
    """Home A builds the context at P1 and exports a mode=max cache to a new repository of
    ``registry``; returns the base layout and that repository."""
    base = base_layout(tmp_path)
    repo = unique_repo("cache")
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=registry,ref={registry.host}/{repo}:main,mode=max")
    return base, repo


def test_a_hot_build_pushing_to_the_cache_s_registry_downloads_no_layer(
    registry: Registry, tmp_path: Path
) -> None:
    base, repo = _warm_registry_cache(registry, tmp_path)
    proxy = FaultProxy(registry.host).start()  # records every request B makes
    try:
        app = f"{proxy.host}/{unique_repo('app')}:v1"
        p = lbuild("build", context(tmp_path, "p2"), "--build-context",
                   f"base=oci-layout://{base}", "--progress", "json",
                   "--cache-from", f"type=registry,ref={proxy.host}/{repo}:main",
                   "--output", f"type=registry,name={app}", home=tmp_path / "hB", env=EPOCH)
    finally:
        proxy.stop()
    events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    b = cached(events)
    assert b and all(b.values()), b
    blob_gets = [path for method, path, _ in proxy.log if method == "GET" and "/blobs/" in path]
    # the records blob, once; never a layer or TOC blob
    assert len(blob_gets) == 1 and f"/v2/{repo}/blobs/" in blob_gets[0]
    mounts = [path for method, path, _ in proxy.log if method == "POST" and "mount=" in path]
    assert len(mounts) == 3  # the app's three layers, mounted from the cache's repository
    done = events[-1]
    assert done["event"] == "done"
    # the pushed image is the one home A exported, digest for digest
    assert [r.rsplit("@", 1)[1] for r in done["pushed"]] == [manifest_digest(tmp_path / "outA")]


def test_a_hot_build_tagged_and_pushed_tags_nothing_its_store_cannot_unpack(
    registry: Registry, tmp_path: Path
) -> None:
    base, repo = _warm_registry_cache(registry, tmp_path)
    app = f"{registry.host}/{unique_repo('app')}:v1"
    home = tmp_path / "hB"
    p = lbuild("build", context(tmp_path, "p2"), "--build-context", f"base=oci-layout://{base}",
               "-t", app, "--push", "--cache-from", f"type=registry,ref={registry.host}/{repo}:main",
               home=home, env=EPOCH)
    clean = manifest_digest(tmp_path / "outA")
    assert f"{app}@{clean}" in p.stdout + p.stderr
    # its layers were mounted registry-side, never downloaded: no local tag names them
    assert f"note: {app} not tagged in the local store" in p.stdout + p.stderr
    assert app not in lbuild("images", home=home).stdout
    u = lbuild("unpack", app, tmp_path / "rootfs", home=home, check=False)
    assert u.returncode != 0 and "missing" not in u.stderr, u.stderr
    # what the note says to do gives the whole image
    lbuild("pull", app, home=home)
    lbuild("unpack", app, tmp_path / "rootfs", home=home)
    assert (tmp_path / "rootfs" / "built").read_text() == "a\nbase\n"


def _layers(layout: Path) -> list[str]:
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs/sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    return [d["digest"] for d in man["layers"]]


def test_a_hot_build_into_the_store_fetches_its_layers_once_and_keeps_a_whole_image(
    registry: Registry, tmp_path: Path
) -> None:
    base, repo = _warm_registry_cache(registry, tmp_path)
    proxy = FaultProxy(registry.host).start()  # records every request B makes
    try:
        p = lbuild("build", context(tmp_path, "p2"), "--build-context",
                   f"base=oci-layout://{base}", "--progress", "json", "-t", "app",
                   "--cache-from", f"type=registry,ref={proxy.host}/{repo}:main",
                   home=tmp_path / "hB", env=EPOCH)
    finally:
        proxy.stop()
    b = cached([json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")])
    assert b and all(b.values()), b
    got = [path.rsplit("/", 1)[1] for method, path, _ in proxy.log
           if method == "GET" and "/blobs/" in path]
    # the records blob, and the compressed layers of the app's three steps (the base's two
    # come from its --build-context layout): each once, side by side; never a TOC blob
    app_layers = _layers(tmp_path / "outA")[2:]
    assert len(got) == 4 and len(set(got)) == 4
    assert set(app_layers) < set(got)
    assert all(in_store(tmp_path / "hB", d) for d in got)
    # the tagged image is whole: it unpacks, and pushes as home A's image, without the cache
    lbuild("unpack", "app", tmp_path / "rootfs", home=tmp_path / "hB")
    assert (tmp_path / "rootfs" / "built").read_text() == "a\nbase\n"
    p = lbuild("push", "app", f"{registry.host}/{unique_repo('app')}:v1", home=tmp_path / "hB")
    assert p.stdout.strip().rsplit("@", 1)[1] == manifest_digest(tmp_path / "outA")


def test_plan_and_why_read_a_shared_cache_and_name_it(tmp_path: Path) -> None:
    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    build(context(tmp_path, "p1"), tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache},mode=max")
    ctx = context(tmp_path, "p2")
    args = ("--build-context", f"base=oci-layout://{base}")
    # an empty home: without the cache every step would be built, so plan --exit-code is 1
    cold = lbuild("plan", ctx, *args, "--exit-code", home=tmp_path / "hB", env=EPOCH, check=False)
    assert cold.returncode == 1
    # with it, every step is covered, and each hit names where it came from
    p = lbuild("plan", ctx, *args, "--exit-code", "--cache-from", f"type=local,src={cache}",
               home=tmp_path / "hB", env=EPOCH)
    rows = [r for r in p.stdout.splitlines() if r.strip()]
    assert rows and all(r.startswith("HIT") for r in rows)
    assert all(f"(from type=local,{cache})" in r for r in rows if "FROM" not in r), rows
    w = lbuild("why", ctx, *args, "--cache-from", f"type=local,src={cache}",
               home=tmp_path / "hB", env=EPOCH)
    hits = [r for r in w.stdout.splitlines() if r.startswith("HIT")]
    assert any("RUN" in r and f"(from type=local,{cache})" in r for r in hits), w.stdout
    # the base layout's blobs and the shared cache's records were read, never stored: plan and
    # why made no home
    assert not (tmp_path / "hB").exists()


def _artifact_is_whole(cache: Path) -> str:
    """The artifact index.json names, after checking every blob it needs is there, intact."""
    import hashlib

    idx = json.loads((cache / "index.json").read_text())
    digest = idx["manifests"][0]["digest"]
    man_bytes = (cache / "blobs/sha256" / digest[7:]).read_bytes()
    assert "sha256:" + hashlib.sha256(man_bytes).hexdigest() == digest
    man = json.loads(man_bytes)
    for d in [man["config"], *man["layers"]]:
        data = (cache / "blobs/sha256" / d["digest"][7:]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]
    return str(digest)


def test_a_cache_to_killed_midway_leaves_a_whole_artifact(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    base = base_layout(tmp_path)
    cache = tmp_path / "cache"
    ctx = context(tmp_path, "p1")
    build(ctx, tmp_path / "hA", base, tmp_path / "outA",
          "--cache-to", f"type=local,dest={cache},mode=max")
    before = _artifact_is_whole(cache)
    (ctx / "big.bin").write_bytes(os.urandom(64 << 20))
    (ctx / "Dockerfile").write_text(DOCKERFILE + "COPY big.bin /big.bin\n")
    env = {**os.environ, **EPOCH, "LBUILD_HOME": str(tmp_path / "hA")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "build", str(ctx), "--build-context",
         f"base=oci-layout://{base}", "--progress", "json",
         "--cache-to", f"type=local,dest={cache},mode=max"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the last step is done: the export is about to run or running
        if '"step_done"' in line and "big.bin" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed while the 64 MiB layer was still being compressed for the export: the ref still
    # names the previous artifact, and every blob it needs is there and intact
    assert _artifact_is_whole(cache) == before
