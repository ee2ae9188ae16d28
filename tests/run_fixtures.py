"""Shared fixtures and helpers for the RUN tests: the busybox base image, built once per module.

A test module says ``pytest_plugins = ["run_fixtures"]`` and asks for ``busybox_home`` (a
module-wide lbuild home that holds ``busybox:test``) or ``bbhome`` (a fresh home per test with
the same image in it: its blobs and index copied, no snapshots).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from util import FIXTURES, lbuild

BUSYBOX = "busybox:test"
BUSYBOX_AVAILABLE = Path("/bin/busybox").is_file()

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not BUSYBOX_AVAILABLE, reason="RUN tests run as root with busybox-static"
)


@pytest.fixture(scope="module")
def busybox_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An lbuild home holding ``busybox:test``, built once per test module by the real CLI."""
    root = tmp_path_factory.mktemp("busybox")
    ctx = root / "ctx"
    subprocess.run(["sh", str(FIXTURES / "busybox" / "prepare-context.sh"), str(ctx)], check=True)
    home = root / "home"
    lbuild(
        "build",
        ctx,
        "-t",
        BUSYBOX,
        "--progress",
        "plain",
        home=home,
        env={"SOURCE_DATE_EPOCH": "0"},
    )
    return home


@pytest.fixture
def bbhome(busybox_home: Path, tmp_path: Path) -> Path:
    """A fresh lbuild home that already holds ``busybox:test`` (no snapshots, no step records
    of the test's own Dockerfiles)."""
    h = tmp_path / "home"
    h.mkdir()
    shutil.copytree(busybox_home / "blobs", h / "blobs")
    for db in busybox_home.glob("lbuild.db*"):
        shutil.copy2(db, h / db.name)
    return h


@dataclass(frozen=True)
class Member:
    """One tar member of a layer, as the tests compare it."""

    name: str
    type: str  # file, dir, symlink, hardlink, char, fifo
    mode: int
    uid: int
    gid: int
    link: str
    data: bytes
    xattrs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Layer:
    """A layer of an image in an OCI layout: its blob's bytes (uncompressed) and members."""

    diff_id: str
    tar: bytes
    members: tuple[Member, ...]

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def get(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise AssertionError(f"{name} not in the layer: {self.names()}")


@dataclass(frozen=True)
class Built:
    """A finished ``lbuild build`` with ``-o type=oci``: the process and the layout."""

    proc: subprocess.CompletedProcess[str]
    layout: Path

    def config(self) -> dict[str, Any]:
        return image_config(self.layout)

    def layers(self) -> list[Layer]:
        return image_layers(self.layout)


_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.FIFOTYPE: "fifo",
}


def image_manifest(layout: Path, tag: str = "latest") -> dict[str, Any]:
    """The manifest tagged ``tag`` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(json.loads(blob(layout, m["digest"])))
    raise AssertionError(f"no tag {tag} in {layout}")


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def image_config(layout: Path, tag: str = "latest") -> dict[str, Any]:
    return dict(json.loads(blob(layout, image_manifest(layout, tag)["config"]["digest"])))


def plain(data: bytes) -> bytes:
    """A blob's uncompressed bytes (gzip or none; zstd when the module is there)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def image_layers(layout: Path, tag: str = "latest") -> list[Layer]:
    import io

    manifest = image_manifest(layout, tag)
    diff_ids = image_config(layout, tag)["rootfs"]["diff_ids"]
    out = []
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        tar = plain(blob(layout, desc["digest"]))
        members = []
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            for ti in tf:
                f = tf.extractfile(ti) if ti.isreg() else None
                xattrs = tuple(
                    sorted(
                        (k[len("SCHILY.xattr.") :], v)
                        for k, v in ti.pax_headers.items()
                        if k.startswith("SCHILY.xattr.")
                    )
                )
                members.append(
                    Member(
                        ti.name.rstrip("/"),
                        _TYPES.get(ti.type, repr(ti.type)),
                        ti.mode,
                        ti.uid,
                        ti.gid,
                        ti.linkname,
                        f.read() if f else b"",
                        xattrs,
                    )
                )
        out.append(Layer(diff_id, tar, tuple(members)))
    return out


def build(
    ctx: Path,
    home: Path,
    dockerfile: str,
    *args: str,
    out: Path | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    files: dict[str, str | bytes] | None = None,
) -> Built:
    """Write ``dockerfile`` (and ``files``) into ``ctx`` and build it with the real CLI into
    an OCI layout (``out``, default ``ctx``/../oci-N)."""
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for rel, content in (files or {}).items():
        p = ctx / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content)
        else:
            p.write_bytes(content)
    if out is None:
        n = 0
        while (ctx.parent / f"oci-{n}").exists():
            n += 1
        out = ctx.parent / f"oci-{n}"
    proc = lbuild(
        "build",
        ctx,
        "--progress",
        "plain",
        "-o",
        f"type=oci,dest={out}",
        *args,
        home=home,
        check=check,
        env=env,
    )
    return Built(proc, out)


def mount_lines(marker: str) -> list[str]:
    """Lines of this process's mount table that mention ``marker`` (a test's own paths)."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if marker in line]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def procs_marked(marker: str) -> list[tuple[int, str]]:
    """Processes (other than this one) whose command line (arguments joined by spaces) or
    environment holds ``marker``."""
    found = []
    needle = marker.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        cmdline = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")
        if needle in cmdline or needle in _read(f"/proc/{pid}/environ"):
            found.append((int(pid), cmdline.decode(errors="replace")))
    return found


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name
