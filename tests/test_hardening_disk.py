"""Disk full (issue 11 item 11): exit 1 naming the home and the step, partial files removed,
the next build not wedged; a decompression bomb is disk full, not bad input; ``cache prune``
clears what interrupted builds left in tmp/."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from util import lbuild

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    """A cache home on a 2 MiB tmpfs."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt / "home"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _errors(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [x for x in p.stderr.splitlines() if "error" in x or "Traceback" in x]


def test_disk_full_during_copy(tmp_path: Path, small_home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY big /big\n")
    (ctx / "big").write_bytes(os.urandom(3 << 20))
    p = lbuild("build", ctx, "--progress", "plain", home=small_home, check=False)
    assert p.returncode == 1
    assert _errors(p) == [
        f"lbuild: error: {ctx}/Dockerfile:2: no space left on device (cache home {small_home}) "
        "while running [stage-0 1/1] COPY big /big "
        "(hint: free some space, or run `lbuild cache prune`)"
    ]
    assert os.listdir(small_home / "tmp") == []  # the partial ingest is gone
    # not wedged: a build that fits works
    (ctx / "big").write_bytes(b"small now\n")
    lbuild("build", ctx, home=small_home)


def test_decompression_bomb_is_disk_full_not_bad_input(tmp_path: Path, small_home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nADD bomb.tar.gz /\n")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("zeros")
        ti.size = 16 << 20
        tf.addfile(ti, io.BytesIO(bytes(ti.size)))
    (ctx / "bomb.tar.gz").write_bytes(gzip.compress(raw.getvalue(), 9))  # ~16 KB
    p = lbuild("build", ctx, "--progress", "plain", home=small_home, check=False)
    assert p.returncode == 1
    errors = _errors(p)
    assert len(errors) == 1 and "no space left on device" in errors[0], p.stderr
    assert "ADD bomb.tar.gz /" in errors[0] and str(small_home) in errors[0]
    assert os.listdir(small_home / "tmp") == []


def test_prune_clears_tmp_leftovers(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\nENV A=1\n")
    lbuild("build", ctx, home=home)
    (home / "tmp" / "ingest-left").write_bytes(b"partial")
    (home / "tmp" / "work").mkdir()
    (home / "tmp" / "work" / "f").write_bytes(b"x")
    dry = lbuild("cache", "prune", "--dry-run", home=home).stdout.splitlines()
    assert "would remove tmp tmp/ingest-left 7 B (leftover)" in dry, dry
    assert sorted(os.listdir(home / "tmp")) == ["ingest-left", "work"]
    out = lbuild("cache", "prune", home=home).stdout.splitlines()
    assert "removed tmp tmp/ingest-left 7 B (leftover)" in out, out
    assert "removed tmp tmp/work 1 B (leftover)" in out, out
    assert os.listdir(home / "tmp") == []
