"""End-to-end outputs of ``lbuild build``: OCI layouts and docker-archives checked by the real
tools, tags in the local store, ``--build-context`` images made by umoci, compression,
reproducibility by construction, and the progress streams."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_build_copy import D, F, Tree, build
from test_build_instructions import raw_config
from util import FIXTURES, lbuild, manifest_digest, tool, tree, umoci_unpack, validate_layout

APP = FIXTURES / "build" / "app"

# What fixtures/build/app builds to (its .dockerignore drops notes.txt and *.tmp).
APP_TREE: Tree = {
    "app": D(),
    "app/data": D(),
    "app/main.py": F('print("hello")\n'),
    "app/run.sh": F("#!/bin/sh\nexec python3 /app/main.py\n", 0o755),
    "app/static": D(),
    "app/static/css": D(),
    "app/static/css/site.css": F("body { margin: 0 }\n"),
    "app/static/index.html": F("<h1>hi</h1>\n"),
}


def copy_app(dest: Path) -> Path:
    """A copy of the fixture with its modes set here (git keeps only the executable bit)."""
    shutil.copytree(APP, dest)
    for p in dest.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() or p.name == "run.sh" else 0o644)
    return dest


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "app")


@pytest.fixture(scope="module")
def ohome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def example(app: Path, ohome: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """fixtures/build/app, built once for the module with a tag."""
    return build(
        app, ohome, tmp_path_factory.mktemp("ex"), None, "-t", "lbuild-test/example:v1", tag="v1"
    )


def test_example_layout_and_tag(example: Any) -> None:
    assert example.tree == APP_TREE
    index = json.loads((example.layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [
        "v1"
    ]
    assert json.loads((example.layout / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }


def test_default_tag_is_latest(app: Path, tmp_path: Path, ohome: Path) -> None:
    b = build(app, ohome, tmp_path)
    index = json.loads((b.layout / "index.json").read_text())
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [
        "latest"
    ]


def test_skopeo_copy_of_the_layout(example: Any, tmp_path: Path) -> None:
    other = tmp_path / "other"
    tool("skopeo", "copy", f"oci:{example.layout}:v1", f"oci:{other}:latest")
    assert tree(umoci_unpack(other, tmp_path / "bundle")) == example.tree
    assert validate_layout(other)["rootfs"] == example.config["rootfs"]


def test_docker_archive(app: Path, tmp_path: Path, ohome: Path) -> None:
    out = tmp_path / "img.tar"
    lbuild(
        "build", app, "-t", "lbuild-test/arch:t2", "--output", f"type=docker,dest={out}", home=ohome
    )
    info = json.loads(tool("skopeo", "inspect", f"docker-archive:{out}").stdout)
    assert len(info["Layers"]) == 3
    with tarfile.open(out) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        manifest = json.load(f)
    assert manifest[0]["RepoTags"] == ["lbuild-test/arch:t2"]
    # the archive holds the same image as an OCI layout built from it
    oci = tmp_path / "oci"
    tool("skopeo", "copy", f"docker-archive:{out}", f"oci:{oci}:latest")
    assert tree(umoci_unpack(oci, tmp_path / "bundle")) == APP_TREE


def test_two_outputs_at_once(app: Path, tmp_path: Path, ohome: Path) -> None:
    lbuild(
        "build",
        app,
        "--output",
        f"type=oci,dest={tmp_path / 'a'}",
        "--output",
        f"type=docker,dest={tmp_path / 'b.tar'}",
        home=ohome,
    )
    validate_layout(tmp_path / "a")
    tool("skopeo", "inspect", f"docker-archive:{tmp_path / 'b.tar'}")


def test_tag_then_from_tag(example: Any, ohome: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "extra").write_text("extra\n")
    os.chmod(ctx / "extra", 0o644)
    b = build(ctx, ohome, tmp_path, "FROM lbuild-test/example:v1\nCOPY extra /app/extra\n")
    assert b.tree == {**APP_TREE, "app/extra": F("extra\n")}
    base_cfg, cfg = raw_config(example.layout), raw_config(b.layout)
    assert cfg["rootfs"]["diff_ids"][:-1] == base_cfg["rootfs"]["diff_ids"]
    assert cfg["history"][: len(base_cfg["history"])] == base_cfg["history"]
    assert cfg["config"]["Cmd"] == ["/app/run.sh"]
    assert cfg["config"]["WorkingDir"] == "/app/data"


def _umoci_image(layout: Path, tag: str, files: dict[str, bytes]) -> None:
    """An image made by umoci (not lbuild): init, new, a layer added raw, config set."""
    if not layout.exists():
        tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:{tag}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.uid, ti.gid = len(data), 0o640, 12, 34
            tf.addfile(ti, io.BytesIO(data))
    layer = layout.parent / f"{tag}-layer.tar"
    layer.write_bytes(buf.getvalue())
    tool("umoci", "raw", "add-layer", "--image", f"{layout}:{tag}", layer)
    tool(
        "umoci",
        "config",
        "--image",
        f"{layout}:{tag}",
        "--config.env",
        f"BASE={tag}",
        "--config.workingdir",
        "/srv",
    )


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("umoci")
    layout = root / "layout"
    _umoci_image(layout, "latest", {"etc/base": b"latest\n"})
    _umoci_image(layout, "v2", {"etc/base": b"v2\n", "opt/tool": b"tool\n"})
    return layout


@pytest.mark.parametrize("suffix,want", [("", "latest"), (":v2", "v2")])
def test_build_context_oci_layout(
    umoci_layout: Path, ohome: Path, tmp_path: Path, suffix: str, want: str
) -> None:
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "mine").write_text("mine\n")
    os.chmod(ctx / "mine", 0o644)
    b = build(
        ctx,
        ohome,
        tmp_path,
        "FROM base\nCOPY mine .\nCOPY --from=base /etc/base /copied\n",
        "--build-context",
        f"base=oci-layout://{umoci_layout}{suffix}",
    )
    expected = {
        "etc": D(),
        "etc/base": F(f"{want}\n", 0o640, 12, 34),
        "srv": D(),
        "srv/mine": F("mine\n"),
        "copied": F(f"{want}\n", 0o640, 12, 34),
    }
    if want == "v2":
        expected.update({"opt": D(), "opt/tool": F("tool\n", 0o640, 12, 34)})
    assert b.tree == expected
    cfg = raw_config(b.layout)["config"]
    assert f"BASE={want}" in cfg["Env"] and cfg["WorkingDir"] == "/srv"


def test_base_image_without_history(ohome: Path, tmp_path: Path) -> None:
    """A base whose layers have no history entries still gives one entry per layer."""
    layout = tmp_path / "layout"
    tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:latest")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("f")
        ti.size, ti.mode = 2, 0o644
        tf.addfile(ti, io.BytesIO(b"x\n"))
    (tmp_path / "l.tar").write_bytes(buf.getvalue())
    tool(
        "umoci",
        "raw",
        "add-layer",
        "--no-history",
        "--image",
        f"{layout}:latest",
        tmp_path / "l.tar",
    )
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "g").write_text("g\n")
    os.chmod(ctx / "g", 0o644)
    b = build(
        ctx,
        ohome,
        tmp_path,
        "FROM base\nLABEL a=b\nCOPY g /g\n",
        "--build-context",
        f"base=oci-layout://{layout}",
    )
    assert b.tree == {"f": F("x\n"), "g": F("g\n")}
    cfg = raw_config(b.layout)
    layers = [h for h in cfg["history"] if not h.get("empty_layer")]
    assert len(layers) == len(cfg["rootfs"]["diff_ids"]) == 2
    assert [h["created_by"] for h in cfg["history"]][-2:] == ["LABEL a=b", "COPY g /g"]


def test_build_context_made_by_umoci_insert(ohome: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    tool("umoci", "init", "--layout", layout)
    tool("umoci", "new", "--image", f"{layout}:latest")
    src = tmp_path / "basefile"
    src.write_text("base\n")
    tool("umoci", "insert", "--image", f"{layout}:latest", src, "/etc/basefile")
    ctx = tmp_path / "c"
    ctx.mkdir()
    b = build(ctx, ohome, tmp_path, "FROM base\n", "--build-context", f"base=oci-layout://{layout}")
    assert b.tree["etc/basefile"][4] == F("base\n")[4]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_compression(app: Path, example: Any, ohome: Path, tmp_path: Path, codec: str) -> None:
    out = tmp_path / "layout"
    lbuild("build", app, "--compression", codec, "--output", f"type=oci,dest={out}", home=ohome)
    manifest = json.loads((out / "blobs/sha256" / manifest_digest(out)[7:]).read_text())
    media = {x["mediaType"] for x in manifest["layers"]}
    want = {
        "none": "application/vnd.oci.image.layer.v1.tar",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    }[codec]
    assert media == {want}
    # the config (diff_ids included) does not depend on the compression
    assert raw_config(out) == raw_config(example.layout)
    if codec == "none":
        validate_layout(out)
        unpack_from = out
    else:
        # umoci 0.4.7 and oci-image-tool 1.0.0-rc1 predate zstd layers: let skopeo (which
        # reads them) convert to gzip first, then unpack as usual
        unpack_from = tmp_path / "gz"
        tool(
            "skopeo",
            "copy",
            "--dest-compress",
            "--dest-compress-format",
            "gzip",
            f"oci:{out}:latest",
            f"oci:{unpack_from}:latest",
        )
    assert tree(umoci_unpack(unpack_from, tmp_path / "bundle")) == APP_TREE


# --- reproducible by construction ----------------------------------------------------------


def _two_checkouts(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "one" / "src", tmp_path / "elsewhere" / "deeper" / "src"
    copy_app(a)
    copy_app(b)
    for i, p in enumerate(sorted(b.rglob("*"))):
        os.utime(p, (1_000_000_000 + i, 1_000_000_000 + 7 * i))
    return a, b


@pytest.mark.slow
@pytest.mark.parametrize("epoch", ["1700000000", None])
def test_reproducible_across_paths_mtimes_and_homes(tmp_path: Path, epoch: str | None) -> None:
    a, b = _two_checkouts(tmp_path)
    env = {"SOURCE_DATE_EPOCH": epoch} if epoch else None
    one = build(a, tmp_path / "home1", tmp_path / "w1", None, env=env, unpack=False)
    two = build(b, tmp_path / "home2", tmp_path / "w2", None, env=env, unpack=False)
    assert one.digest == two.digest
    created = raw_config(one.layout)["created"]
    assert created == ("2023-11-14T22:13:20Z" if epoch else "1970-01-01T00:00:00Z")
    # and the same again from a warm cache
    three = build(b, tmp_path / "home1", tmp_path / "w3", None, env=env, unpack=False)
    assert three.digest == one.digest


def test_source_date_epoch_changes_the_digest(app: Path, tmp_path: Path, ohome: Path) -> None:
    one = build(app, ohome, tmp_path, None, unpack=False, env={"SOURCE_DATE_EPOCH": "1700000000"})
    two = build(app, ohome, tmp_path, None, unpack=False, env={"SOURCE_DATE_EPOCH": "1700000001"})
    assert one.digest != two.digest


# --- progress ----------------------------------------------------------------------------------


def _json_events(stdout: str) -> list[dict[str, Any]]:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]  # each line must be one JSON object


def test_progress_json(app: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"

    def run() -> tuple[list[dict[str, Any]], Path]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        p = lbuild(
            "build", app, "--progress", "json", "--output", f"type=oci,dest={out}", home=home
        )
        return _json_events(p.stdout), out

    first, out1 = run()
    second, out2 = run()
    for events, out in ((first, out1), (second, out2)):
        assert all(isinstance(e, dict) for e in events)
        assert events[-1]["event"] == "done"
        assert events[-1]["digest"] == manifest_digest(out)
    last: dict[str, dict[str, Any]] = {}
    for e in first:
        if "id" in e:
            last[e["id"]] = e
    assert last and all(isinstance(e["cached"], bool) for e in last.values())
    assert not all(e["cached"] for e in last.values())
    last2 = {e["id"]: e for e in second if "id" in e}
    assert set(last2) == set(last)
    assert all(e["cached"] is True for e in last2.values())
    assert second[-1]["digest"] == first[-1]["digest"]


def test_progress_plain_names_the_digest(app: Path, tmp_path: Path, ohome: Path) -> None:
    out = tmp_path / "out"
    p = lbuild("build", app, "--progress", "plain", "--output", f"type=oci,dest={out}", home=ohome)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines[-1].split()[-1] == manifest_digest(out)
    assert any(ln.endswith(" CACHED") or " DONE " in ln for ln in lines[:-1])


def test_a_base_layers_toc_is_kept_for_later_builds(umoci_layout: Path, tmp_path: Path) -> None:
    """A base image's layer has no step record to name its TOC blob: the build that imports
    it keeps one under the home's tocs/ (the TOC of the tar, as reading it gives), and later
    builds take the base's view from that blob instead of reading the tar again."""
    from dataclasses import replace

    from cache.layers.tar import read_toc
    from cache.layers.toc import layer_toc, remember_layer_toc
    from cache.store.blobs import BlobStore

    home = tmp_path / "home"
    ctx = tmp_path / "c"
    ctx.mkdir()
    (ctx / "mine").write_text("mine\n")
    dockerfile = "FROM base\nCOPY mine /etc/mine\nCOPY --from=base /etc/base /copied\n"
    spec = f"base=oci-layout://{umoci_layout}"
    b = build(ctx, home, tmp_path / "1", dockerfile, "--build-context", spec)
    assert b.tree["copied"] == F("latest\n", 0o640, 12, 34)
    store = BlobStore(home)
    (diff_id,) = raw_config(b.layout)["rootfs"]["diff_ids"][:1]
    assert (home / "tocs" / diff_id.removeprefix("sha256:")).is_file()
    with store.open(diff_id) as f:
        from_tar = read_toc(f)
    assert layer_toc(store, diff_id) == from_tar
    # the kept TOC is what the next build reads: a different one shows in its image
    other = tuple(replace(e, mode=0o600) if e.path == "etc/base" else e for e in from_tar)
    assert other != from_tar
    remember_layer_toc(store, diff_id, other)
    b = build(ctx, home, tmp_path / "2", dockerfile, "--build-context", spec, "--no-cache")
    assert b.tree["copied"] == F("latest\n", 0o600, 12, 34)
