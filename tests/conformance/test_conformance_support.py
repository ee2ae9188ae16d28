"""Checks of the conformance suite itself: its tree reader against umoci, its table against
cases.py."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
import table
from harness import Entry, Env, Image, read_image, run

_KIND = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFIFO: "fifo", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}


def test_readme_table_is_current() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    assert table.readme_with_table(readme) == readme, \
        "tests/conformance/README.md is stale: run python3 tests/conformance/table.py"


def _walk(rootfs: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(rootfs)):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            rel = os.fsdecode(os.path.relpath(full, os.fsencode(rootfs)))
            st = os.lstat(full)
            kind = _KIND[stat.S_IFMT(st.st_mode)]
            digest = None
            if kind == "file":
                with open(full, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            target = os.fsdecode(os.readlink(full)) if kind == "symlink" else None
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None
            xattrs = {} if kind == "symlink" else {
                k: os.getxattr(full, k, follow_symlinks=False)
                for k in os.listxattr(full, follow_symlinks=False)}
            out[rel] = (kind, stat.S_IMODE(st.st_mode) if kind != "symlink" else 0o777,
                        st.st_uid, st.st_gid, st.st_size if kind == "file" else 0, digest, target,
                        dev, xattrs, int(st.st_mtime) if kind != "dir" else None)
    links = {p: tuple(sorted(g)) for g in inodes.values() if len(g) > 1 for p in g}
    return {p: (*v, links.get(p)) for p, v in out.items()}


def _view(img: Image) -> dict[str, tuple[object, ...]]:
    links = img.links()

    def one(p: str, e: Entry) -> tuple[object, ...]:
        mode = 0o777 if e.kind == "symlink" else e.mode
        return (e.kind, mode, e.uid, e.gid, e.size, e.digest, e.target, e.dev, e.xattrs,
                e.mtime if e.kind != "dir" else None, links.get(p))
    return {p: one(p, e) for p, e in img.tree.items()}


@pytest.mark.slow
def test_reader_matches_umoci_unpack(conformance: Env, tmp_path: Path) -> None:
    """harness.read_image gives the tree umoci unpack (as root) gives, for an image with
    whiteouts, an opaque dir, type changes, hardlinks, a fifo and special modes (built by
    buildah) and for the base image whose second layer lacks parent entries."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    df = tmp_path / "Dockerfile"
    df.write_text(
        "FROM base\n"
        "RUN rm -rf /opt/old && mkdir /opt/old && echo n > /opt/old/new && rm /etc/motd && "
        "mkdir /etc/motd && mkdir /h && echo x > /h/a && ln /h/a /h/b && ln /h/a /h/c && "
        "mkfifo /h/f && ln -s /tmp /h/l && chmod 4755 /h/a && chown 5:6 /h/c && "
        "rm /opt/link && mkdir /opt/link\n"
        "RUN rm -rf /h/b /opt/lib && rm -rf /opt/link && ln -s old /opt/link\n")
    out = tmp_path / "peer.oci"
    conformance.buildah.build(ctx, df, out, build_args={}, target=None)
    for layout in (out, conformance.base):
        bundle = tmp_path / ("bundle-" + layout.name)
        run("umoci", "unpack", "--image", f"{layout}:latest", bundle)
        assert _view(read_image(layout)) == _walk(bundle / "rootfs"), layout
