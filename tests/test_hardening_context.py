"""Hardening of the build context (issue 11 items 5 and 16): a context file is opened once,
without following symlinks, and must still be the file the walk saw; what COPY copies."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from builder.plan.context import hash_file
from cache.errors import LbuildError
from cache.layers.tar import write_layer
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Entry

SECRET = b"root-only host file\n"


@pytest.fixture
def swapped(tmp_path: Path) -> tuple[Path, os.stat_result, Path]:
    """A context file stat'ed by the walk, then swapped for a symlink to a host file."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    f = ctx / "app.txt"
    f.write_bytes(b"app\n")
    st = f.lstat()
    f.unlink()
    f.symlink_to(secret)
    return f, st, secret


def test_hasher_does_not_follow_a_symlink_swapped_in(
    swapped: tuple[Path, os.stat_result, Path],
) -> None:
    f, st, _ = swapped
    with pytest.raises(LbuildError, match="file changed while being read"):
        hash_file(f, st)


def test_hasher_refuses_another_file_than_the_walk_saw(tmp_path: Path) -> None:
    """A parent directory swapped for a symlink passes O_NOFOLLOW: the inode check catches it."""
    ctx = tmp_path / "ctx"
    (ctx / "d").mkdir(parents=True)
    (ctx / "d" / "f").write_bytes(b"app\n")
    st = (ctx / "d" / "f").lstat()
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_bytes(SECRET)
    os.rename(ctx / "d", tmp_path / "moved")
    (ctx / "d").symlink_to(host)
    with pytest.raises(LbuildError, match="file changed while being read"):
        hash_file(ctx / "d" / "f", st)
    # unchanged: the walk's file is hashed
    os.unlink(ctx / "d")
    os.rename(tmp_path / "moved", ctx / "d")
    assert hash_file(ctx / "d" / "f", st) == blake3.blake3(b"app\n").hexdigest()


@pytest.mark.parametrize("size", [4, 3 << 20])  # read whole, and streamed in chunks
def test_layer_writer_does_not_follow_a_symlink_swapped_in(tmp_path: Path, size: int) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * size)
    f = tmp_path / "app.bin"
    f.symlink_to(secret)
    store = BlobStore(tmp_path / "store")
    entry = Entry("app.bin", "file", 0o644, size=size, source=ContentRef(host_path=str(f)))
    with pytest.raises(LbuildError, match="file changed while being read"):
        write_layer([entry], store)
    assert list(store.digests()) == []
    assert os.listdir(tmp_path / "store" / "tmp") == []



@pytest.mark.parametrize("size", [4, 3 << 20])  # read whole, and streamed in chunks
def test_layer_writer_refuses_a_file_that_is_not_the_walked_one(tmp_path: Path, size: int) -> None:
    """The writer's one descriptor must be the walk's (device, inode) and size: another file
    renamed over the path is refused even with the very bytes the plan hashed."""
    data = b"a" * size
    f = tmp_path / "app.bin"
    f.write_bytes(data)
    st = os.lstat(f)
    entry = Entry("app.bin", "file", 0o644, size=size, digest=blake3.blake3(data).hexdigest(),
                  source=ContentRef(host_path=str(f), ident=(st.st_dev, st.st_ino)))
    (tmp_path / "other").write_bytes(data)
    os.rename(tmp_path / "other", f)
    store = BlobStore(tmp_path / "store")
    with pytest.raises(LbuildError, match=r"file changed while being read: .*app\.bin "
                                          r"\(not the file the context walk saw\)"):
        write_layer([entry], store)
    f.write_bytes(data + b"!")  # the walked file itself, grown since
    entry = Entry("app.bin", "file", 0o644, size=size, digest=entry.digest,
                  source=ContentRef(host_path=str(f), ident=(st.st_dev, os.lstat(f).st_ino)))
    with pytest.raises(LbuildError, match=rf"\({size + 1} bytes, not {size}\)"):
        write_layer([entry], store)
    assert list(store.digests()) == []


def _layer_tars(layout: Path) -> list[bytes]:
    """Every layer of an OCI layout, decompressed."""
    import gzip
    import json

    out: list[bytes] = []
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        man = json.loads((layout / "blobs" / "sha256" / m["digest"][7:]).read_bytes())
        for layer in man["layers"]:
            raw = (layout / "blobs" / "sha256" / layer["digest"][7:]).read_bytes()
            out.append(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    return out


@pytest.mark.slow
def test_race_a_file_swapped_with_a_symlink_to_a_secret_never_leaks_it(
    tmp_path: Path, home: Path
) -> None:
    """Issue 11 item 5, for real: while a thread renames a context file and a symlink to a
    secret outside the context over each other in a tight loop, ``COPY . /ctx/`` builds
    again and again.  No layer of a build that succeeds holds the secret's bytes; a build
    that fails exits 1 with one line naming the file."""
    import threading

    from util import lbuild

    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-" + os.urandom(16).hex().encode() + b"\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    (ctx / ".dockerignore").write_text("Dockerfile\n")
    aux = tmp_path / "aux"  # the same filesystem, outside the context
    aux.mkdir()
    (aux / "file").write_bytes(b"public bytes\n")
    target = ctx / "data"
    os.link(aux / "file", target)
    stop = threading.Event()
    swaps = [0]

    def swap() -> None:  # each rename() replaces the path atomically: it always exists
        while not stop.is_set():
            os.symlink(secret, aux / "l")
            os.rename(aux / "l", target)
            os.link(aux / "file", aux / "f")
            os.rename(aux / "f", target)
            swaps[0] += 1

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    results = []
    try:
        for n in range(12):
            out = tmp_path / f"out{n}"
            p = lbuild("build", ctx, "--no-cache", "-q", "-o",
                       f"type=oci,dest={out}", home=home, check=False)
            results.append((p, out))
    finally:
        stop.set()
        t.join()
    assert swaps[0] > 20
    ok = [out for p, out in results if p.returncode == 0]
    failed = [p for p, _ in results if p.returncode != 0]
    for p in failed:
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, p.stderr
        assert lines[0].startswith("lbuild: error: "), lines
        assert f"file changed while being read: {target}" in lines[0], lines
    for out in ok:
        tars = _layer_tars(out)
        assert tars and not any(secret.read_bytes() in t for t in tars)
    print(f"{len(ok)} built, {len(failed)} failed, {swaps[0]} swaps")


# --- item 16: what COPY copies -----------------------------------------------------------------


def _build(ctx: Path, home: Path, out: Path, *args: str) -> dict[str, bool]:
    import json

    from util import lbuild

    p = lbuild("build", ctx, "--progress", "json", "-o", f"type=oci,dest={out}", *args, home=home)
    events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return {e["name"]: e["cached"] for e in events if e.get("event") == "step_done"}


@pytest.mark.slow
def test_copy_keeps_xattrs_and_fifos_and_odd_names(tmp_path: Path, home: Path) -> None:
    """File capabilities and user xattrs are kept (and are in the key), ``COPY .`` copies a
    fifo, and a non-UTF-8 file name goes into the image byte for byte."""
    from util import umoci_unpack

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /app/\n")
    tool = ctx / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    os.setxattr(tool, "security.capability", cap)
    os.setxattr(tool, "user.note", b"hello")
    os.mkfifo(ctx / "pipe")
    odd = b"caf\xe9.txt"  # Latin-1, not UTF-8
    with open(os.path.join(os.fsencode(ctx), odd), "wb") as f:
        f.write(b"odd\n")

    first = _build(ctx, home, tmp_path / "one")
    assert list(first.values()) == [False]
    root = umoci_unpack(tmp_path / "one", tmp_path / "b1")
    assert os.getxattr(root / "app/tool", "security.capability") == cap
    assert os.getxattr(root / "app/tool", "user.note") == b"hello"
    assert stat_kind(root / "app/pipe") == "fifo"
    assert odd in os.listdir(os.fsencode(root / "app"))
    with open(os.path.join(os.fsencode(root / "app"), odd), "rb") as f:
        assert f.read() == b"odd\n"

    assert list(_build(ctx, home, tmp_path / "two").values()) == [True]  # names stay hashable
    os.setxattr(tool, "user.note", b"changed")  # same bytes, new xattr: a miss, a new layer
    assert list(_build(ctx, home, tmp_path / "three").values()) == [False]
    root = umoci_unpack(tmp_path / "three", tmp_path / "b3")
    assert os.getxattr(root / "app/tool", "user.note") == b"changed"


def stat_kind(p: Path) -> str:
    import stat as st

    mode = p.lstat().st_mode
    return "fifo" if st.S_ISFIFO(mode) else "file" if st.S_ISREG(mode) else "other"


@pytest.mark.slow
def test_context_a_thousand_directories_deep(tmp_path: Path, home: Path) -> None:
    from util import lbuild

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /app/\n")
    fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1000):  # relative to a directory fd: no path gets long
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep\n")
        os.close(leaf)
    finally:
        os.close(fd)
    try:
        _build(ctx, home, tmp_path / "out")
        # the layer read with Python's tarfile (umoci takes minutes over 1,000 levels here)
        from run_fixtures import image_layers

        (layer,) = image_layers(tmp_path / "out")
        deep = "app/" + "/".join(["d"] * 1000)
        assert layer.get(f"{deep}/leaf").data == b"deep\n"
        assert layer.get(deep).type == "dir"
        # the no-op probe and the stat index walk it too
        p = lbuild("build", ctx, "--progress", "plain", home=home)
        assert "1/1 steps cached" in p.stdout + p.stderr
    finally:  # pytest's own cleanup of old temp dirs recurses: leave nothing this deep
        import subprocess

        subprocess.run(["rm", "-rf", str(ctx)], check=True)


def test_docker_output_to_a_directory_is_bad_input_naming_it(tmp_path: Path, home: Path) -> None:
    from util import lbuild

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nENV A=1\n")
    dest = tmp_path / "adir"
    dest.mkdir()
    p = lbuild("build", ctx, "-o", f"type=docker,dest={dest}", home=home, check=False)
    assert p.returncode == 2
    errors = [x for x in p.stderr.splitlines() if "error" in x or "Traceback" in x]
    assert errors == [
        f"lbuild: error: docker archive destination {dest} is a directory (name a file)"
    ]
    assert sorted(os.listdir(tmp_path)) == ["adir", "ctx", "home"]
    assert os.listdir(dest) == []
