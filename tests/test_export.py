"""Tests for builder.export.oci, checked with the real tools: oci-image-tool, skopeo, umoci."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from builder.export.oci import (
    Image,
    canonical_json,
    export_docker_archive,
    export_oci_layout,
    load_oci_layout,
    make_image,
)
from cache.errors import DigestMismatch, InvalidInput, NotFound
from cache.layers.tar import compress_layer, write_layer
from cache.store.blobs import BlobStore
from cache.types import Compression, ContentRef, Digest, Entry, LayerInfo, sha256_digest

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("skopeo", "umoci", "oci-image-tool")),
    reason="needs skopeo, umoci and oci-image-tool",
)

LONG = "deep/" + "n" * 120
Tree = dict[str, tuple[Any, ...]]


def f(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "file", mode, uid, gid, size=len(data), source=ContentRef(data=data))


def d(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "dir", mode, uid, gid)


LAYER1 = [
    d("bin"),
    f("bin/tool", b"\x7fELF pretend\n", 0o4755),
    Entry("bin/hard", "hardlink", 0o4755, link="bin/tool"),
    Entry("bin/sh", "symlink", 0o777, link="tool"),
    d("etc"),
    f("etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
    f("etc/gone", b"deleted in layer 2\n"),
    d("home"),
    d("home/user", 0o700, 1000, 1000),
    f("home/user/notes", b"secret\n", 0o600, 1000, 1000),
    d("old"),
    f("old/a", b"hidden by the opaque marker\n"),
    d("données"),
    f("données/ファイル", "unicode ✓\n".encode()),
    d("deep"),
    f(LONG, b"long name\n"),
    d("tmp", 0o1777),
]
LAYER2 = [
    d("etc"),
    Entry("etc/gone", "whiteout"),
    f("etc/motd", b"welcome\n"),
    d("old", 0o750),
    Entry("old", "opaque"),
    f("old/new", b"fresh\n"),
]
EXPECTED: Tree = {
    "bin": ("dir", 0o755, 0, 0),
    "bin/tool": ("file", 0o4755, 0, 0, b"\x7fELF pretend\n"),
    "bin/hard": ("file", 0o4755, 0, 0, b"\x7fELF pretend\n"),
    "bin/sh": ("symlink", "tool"),
    "etc": ("dir", 0o755, 0, 0),
    "etc/passwd": (
        "file",
        0o644,
        0,
        0,
        b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    ),
    "etc/motd": ("file", 0o644, 0, 0, b"welcome\n"),
    "home": ("dir", 0o755, 0, 0),
    "home/user": ("dir", 0o700, 1000, 1000),
    "home/user/notes": ("file", 0o600, 1000, 1000, b"secret\n"),
    "old": ("dir", 0o750, 0, 0),
    "old/new": ("file", 0o644, 0, 0, b"fresh\n"),
    "données": ("dir", 0o755, 0, 0),
    "données/ファイル": ("file", 0o644, 0, 0, "unicode ✓\n".encode()),
    "deep": ("dir", 0o755, 0, 0),
    LONG: ("file", 0o644, 0, 0, b"long name\n"),
    "tmp": ("dir", 0o1777, 0, 0),
}


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc.stdout


def arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def build(
    store: BlobStore, codecs: tuple[Compression, Compression] = ("gzip", "gzip")
) -> tuple[Image, tuple[LayerInfo, LayerInfo], dict[str, Any]]:
    l1, l2 = write_layer(LAYER1, store), write_layer(LAYER2, store)
    blobs = [compress_layer(store, li.diff_id, c) for li, c in zip((l1, l2), codecs, strict=True)]
    config = {
        "architecture": arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [l1.diff_id, l2.diff_id]},
        "history": [{"created_by": "COPY layer1 /"}, {"created_by": "COPY layer2 /"}],
    }
    return make_image(store, config, blobs), (l1, l2), config


def walk(root: Path) -> Tree:
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            else:
                mode = stat.S_IMODE(st.st_mode)
                tree[rel] = ("file", mode, st.st_uid, st.st_gid, p.read_bytes())
    return tree


def test_make_image_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, (l1, l2), config = build(store)
    again = make_image(store, config, image.layers)
    assert again == image
    manifest = json.loads(image.manifest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": image.config_digest,
        "size": len(image.config),
    }
    assert [x["digest"] for x in manifest["layers"]] == [x.digest for x in image.layers]
    assert image.diff_ids == (l1.diff_id, l2.diff_id)
    assert store.read(image.manifest_digest) == image.manifest
    assert json.loads(store.read(image.config_digest)) == config
    assert image.config == canonical_json(config)


def test_make_image_rejects_bad_input(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, _, config = build(store)
    with pytest.raises(InvalidInput, match="architecture"):
        make_image(store, {k: v for k, v in config.items() if k != "architecture"}, image.layers)
    with pytest.raises(InvalidInput, match="diff_ids"):
        make_image(store, config, image.layers[:1])
    missing = image.layers[0].__class__(
        digest=sha256_digest("0" * 64), size=1, media_type=image.layers[0].media_type
    )
    with pytest.raises(NotFound):
        make_image(store, config, [missing, image.layers[1]])


@pytest.mark.slow
def test_oci_layout_passes_the_real_tools(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, _, config = build(store)
    layout = tmp_path / "out" / "layout"
    export_oci_layout(store, image, layout)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert sorted(os.listdir(layout.parent)) == ["layout"]  # no temp dir left beside it

    out = run("oci-image-tool", "validate", "--type", "image", "--ref", "name=latest", layout)
    assert "Validation succeeded" in out
    inspect = json.loads(run("skopeo", "inspect", f"oci:{layout}:latest"))
    assert inspect["Digest"] == image.manifest_digest
    assert inspect["Layers"] == [x.digest for x in image.layers]
    assert json.loads(run("skopeo", "inspect", "--config", f"oci:{layout}:latest")) == config
    run("skopeo", "copy", f"oci:{layout}:latest", f"oci:{tmp_path / 'copy'}:latest")

    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    tree = walk(bundle / "rootfs")
    assert tree == EXPECTED
    rootfs = bundle / "rootfs"
    assert os.lstat(rootfs / "bin/hard").st_ino == os.lstat(rootfs / "bin/tool").st_ino


@pytest.mark.slow
def test_existing_layout_keeps_other_tags_and_replaces_same_tag(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, (l1, _), config = build(store)
    single = make_image(
        store, {**config, "rootfs": {"type": "layers", "diff_ids": [l1.diff_id]}}, image.layers[:1]
    )
    layout = tmp_path / "layout"
    export_oci_layout(store, single, layout, tag="v1")
    export_oci_layout(store, single, layout, tag="v2")
    export_oci_layout(store, image, layout, tag="v1")
    index = json.loads((layout / "index.json").read_text())
    refs = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in index["manifests"]
    }
    assert refs == {"v1": image.manifest_digest, "v2": single.manifest_digest}
    for tag, want in refs.items():
        assert json.loads(run("skopeo", "inspect", f"oci:{layout}:{tag}"))["Digest"] == want
    assert [p.name for p in layout.parent.iterdir() if p.name.startswith(".")] == []

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file").write_text("not a layout")
    with pytest.raises(InvalidInput, match="not an OCI image layout"):
        export_oci_layout(store, image, junk)
    assert sorted(os.listdir(junk)) == ["file"]


@pytest.mark.slow
def test_docker_archive(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, (l1, l2), config = build(store)
    archive = tmp_path / "image.tar"
    export_docker_archive(store, image, archive, ["example.com/team/app:1.0", "app"])
    assert not archive.with_name("image.tar.tmp").exists()
    inspect = json.loads(run("skopeo", "inspect", f"docker-archive:{archive}"))
    assert inspect["Architecture"] == arch() and inspect["Env"] == ["PATH=/bin"]
    tagged = json.loads(run("skopeo", "inspect", f"docker-archive:{archive}:app:latest"))
    assert tagged["Os"] == "linux"
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert manifest[0]["RepoTags"] == ["example.com/team/app:1.0", "app:latest"]
        layers = [t.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
        assert json.loads(t.extractfile(manifest[0]["Config"]).read()) == config  # type: ignore[union-attr]
    assert [sha256_digest(hashlib.sha256(b).hexdigest()) for b in layers] == [
        l1.diff_id,
        l2.diff_id,
    ]
    bundle_layout = tmp_path / "from-archive"
    run("skopeo", "copy", f"docker-archive:{archive}", f"oci:{bundle_layout}:latest")
    run("umoci", "unpack", "--image", f"{bundle_layout}:latest", tmp_path / "bundle")
    assert walk(tmp_path / "bundle" / "rootfs") == EXPECTED


def test_load_own_layout_round_trip(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, layers, _ = build(store)
    layout = tmp_path / "layout"
    export_oci_layout(store, image, layout)
    fresh = BlobStore(tmp_path / "fresh")
    loaded, infos = load_oci_layout(fresh, layout)
    assert loaded == image
    assert infos == layers  # same diff_ids and the same TOCs, offsets included
    for digest in [image.manifest_digest, image.config_digest, *(x.digest for x in image.layers)]:
        assert fresh.verify(digest)
    for li in infos:
        assert fresh.verify(li.diff_id)


@pytest.mark.slow
def test_load_zstd_layout_and_skopeo_copies_it(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, layers, _ = build(store, ("zstd", "gzip"))
    layout = tmp_path / "layout"
    export_oci_layout(store, image, layout)
    copy = tmp_path / "copy"
    run("skopeo", "copy", f"oci:{layout}:latest", f"oci:{copy}:latest")
    loaded, infos = load_oci_layout(BlobStore(tmp_path / "fresh"), copy)
    assert [i.diff_id for i in infos] == [li.diff_id for li in layers]
    assert loaded.diff_ids == image.diff_ids


@pytest.mark.slow
def test_load_a_layout_made_by_umoci(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub/a").write_bytes(b"from umoci\n")
    os.symlink("a", src / "sub/link")
    layout = tmp_path / "um"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:latest")
    run("umoci", "insert", "--image", f"{layout}:latest", src, "/opt")
    run("umoci", "insert", "--image", f"{layout}:latest", "--whiteout", "/opt/sub/link")
    store = BlobStore(tmp_path / "s")
    image, infos = load_oci_layout(store, layout)
    assert len(infos) == 2 and image.diff_ids == tuple(i.diff_id for i in infos)
    toc1 = {(e.path, e.type): e for e in infos[0].toc}
    assert toc1[("opt/sub/link", "symlink")].link == "a"
    a = toc1[("opt/sub/a", "file")]
    with store.open(infos[0].diff_id) as fh:
        fh.seek(a.offset)
        assert fh.read(a.size) == b"from umoci\n"
    assert [(e.path, e.type) for e in infos[1].toc] == [("opt/sub/link", "whiteout")]
    index = json.loads((layout / "index.json").read_bytes())
    assert image.manifest_digest == index["manifests"][0]["digest"]
    for x in image.layers:
        assert store.verify(x.digest)
    # what lbuild loaded, it can write back out for the tools
    out = tmp_path / "re-export"
    export_oci_layout(store, image, out, tag="again")
    run("umoci", "unpack", "--image", f"{out}:again", tmp_path / "bundle")
    assert (tmp_path / "bundle/rootfs/opt/sub/a").read_bytes() == b"from umoci\n"
    assert not os.path.lexists(tmp_path / "bundle/rootfs/opt/sub/link")


def test_load_errors(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, (l1, l2), config = build(store)
    layout = tmp_path / "layout"
    export_oci_layout(store, image, layout)
    with pytest.raises(NotFound, match="no image tagged"):
        load_oci_layout(BlobStore(tmp_path / "a"), layout, tag="nope")
    with pytest.raises(NotFound, match="not an OCI image layout"):
        load_oci_layout(BlobStore(tmp_path / "a"), tmp_path)

    # wrong diff_ids in the config (every other tool misses this one but umoci)
    swapped = make_image(
        store, {**config, "rootfs": {"type": "layers", "diff_ids": [l2.diff_id, l1.diff_id]}},
        image.layers,
    )  # fmt: skip
    bad_ids = tmp_path / "bad-ids"
    export_oci_layout(store, swapped, bad_ids)
    with pytest.raises(DigestMismatch, match="diff_id"):
        load_oci_layout(BlobStore(tmp_path / "b"), bad_ids)

    # changed layer bytes (same size)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(layout, corrupt)
    blob = corrupt / "blobs" / "sha256" / image.layers[1].digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.unlink()  # hardlinked from the store: never write through it
    blob.write_bytes(bytes(data))
    fresh = BlobStore(tmp_path / "c")
    with pytest.raises(DigestMismatch):
        load_oci_layout(fresh, corrupt)
    assert not fresh.has(image.layers[1].digest)
    assert store.verify(image.layers[1].digest)  # the source store was not touched


def test_load_follows_a_nested_index_to_this_platform(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "s")
    image, layers, _ = build(store)
    layout = tmp_path / "layout"
    export_oci_layout(store, image, layout)
    blobs = layout / "blobs" / "sha256"
    bogus = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             "digest": sha256_digest("1" * 64), "size": 10,
             "platform": {"architecture": "mips64", "os": "linux"}}  # fmt: skip
    real = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.manifest_digest, "size": len(image.manifest),
            "platform": {"architecture": arch(), "os": "linux"}}  # fmt: skip
    inner = canonical_json({"schemaVersion": 2, "manifests": [bogus, real]})
    inner_digest = Digest("sha256:" + hashlib.sha256(inner).hexdigest())
    (blobs / inner_digest.split(":")[1]).write_bytes(inner)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": inner_digest,
                "size": len(inner),
                "annotations": {"org.opencontainers.image.ref.name": "multi"},
            }
        ],
    }
    (layout / "index.json").write_bytes(canonical_json(index))
    loaded, infos = load_oci_layout(BlobStore(tmp_path / "fresh"), layout, tag="multi")
    assert loaded.manifest_digest == image.manifest_digest
    assert infos == layers
