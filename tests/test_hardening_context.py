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


def test_hasher_does_not_follow_a_symlink_swapped_in(swapped: tuple[Path, os.stat_result, Path]) -> None:
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
def test_layer_writer_does_not_follow_a_symlink_swapped_in(
    tmp_path: Path, size: int
) -> None:
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
