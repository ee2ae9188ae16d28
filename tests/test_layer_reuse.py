"""Layer reuse by content: a step that misses only because a step below it changed, and whose
entries are the same as before, gets the layer written last time without reading its files.

"Without reading" is observed for real: the build runs under ``strace -f -e trace=open,openat``
and the test looks at which files it opened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from util import lbuild, manifest_digest

ROOT = Path(__file__).resolve().parents[1]
BIG = 8 << 20

DOCKERFILE = """\
FROM scratch
COPY small.txt /small.txt
WORKDIR /app
COPY big/ /app/big/
ENV X=1
"""

pytestmark = pytest.mark.skipif(
    shutil.which("strace") is None, reason="needs strace (.ci/run installs it)"
)


def _build_traced(ctx: Path, home: Path, out: Path, log: Path) -> tuple[set[str], dict[str, bool]]:
    """Build under strace; return the paths the build opened and which steps were cached."""
    env = dict(os.environ, LBUILD_HOME=str(home))
    p = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(log),
         sys.executable, "-m", "builder", "build", str(ctx), "--progress", "json",
         "--output", f"type=oci,dest={out}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    opened = set()
    for line in log.read_text().splitlines():
        if '"' in line and "ENOENT" not in line:
            opened.add(line.split('"')[1])
    cached = {}
    for line in (p.stdout + p.stderr).splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == "step_done":
                cached[ev["name"]] = ev["cached"]
    return opened, cached


def test_unchanged_copy_above_an_edit_reuses_its_layer_without_reading(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "big").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "small.txt").write_text("one\n")
    (ctx / "big" / "blob.bin").write_bytes(os.urandom(BIG))
    time.sleep(2.1)  # past the stat index's racy window: hashes are remembered, not re-read
    home = tmp_path / "home"

    big = str(ctx / "big" / "blob.bin")

    opened, cached = _build_traced(ctx, home, tmp_path / "out0", tmp_path / "trace0")
    assert big in opened  # the first build reads the big file (hash, then tar)
    assert not any(cached.values())

    (ctx / "small.txt").write_text("two\n")  # the first COPY changes: everything above misses
    opened, cached = _build_traced(ctx, home, tmp_path / "out1", tmp_path / "trace1")
    (big_step,) = [name for name in cached if name.endswith("COPY big/ /app/big/")]
    assert cached[big_step] is False, cached  # a miss: its parent changed ...
    assert str(ctx / "small.txt") in opened
    assert big not in opened  # ... yet the big file was neither hashed nor tarred again

    # the image is what a build from scratch gives
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'ref'}", home=home)
    assert manifest_digest(tmp_path / "out1") == manifest_digest(tmp_path / "ref")

    # and the trace does see reads: an edit inside big/ reads it again
    with open(ctx / "big" / "blob.bin", "r+b") as f:
        f.write(b"changed")
    (ctx / "small.txt").write_text("three\n")
    opened, cached = _build_traced(ctx, home, tmp_path / "out2", tmp_path / "trace2")
    assert big in opened
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'ref2'}", home=home)
    assert manifest_digest(tmp_path / "out2") == manifest_digest(tmp_path / "ref2")


def test_reuse_needs_the_same_entries_not_just_the_same_sources(tmp_path: Path) -> None:
    """A changed destination fact (here: mode bits of a source) gives another layer."""
    ctx = tmp_path / "ctx"
    (ctx / "big").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "small.txt").write_text("one\n")
    (ctx / "big" / "run.sh").write_text("#!/bin/sh\n")
    home = tmp_path / "home"
    lbuild("build", ctx, "--output", f"type=oci,dest={tmp_path / 'a'}", home=home)
    os.chmod(ctx / "big" / "run.sh", 0o755)
    (ctx / "small.txt").write_text("two\n")
    lbuild("build", ctx, "--output", f"type=oci,dest={tmp_path / 'b'}", home=home)
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'c'}", home=home)
    assert manifest_digest(tmp_path / "b") == manifest_digest(tmp_path / "c")
    assert manifest_digest(tmp_path / "a") != manifest_digest(tmp_path / "b")


def test_missing_or_unreadable_toc_blobs_fall_back_to_the_tar(tmp_path: Path) -> None:
    """A hit whose TOC blob is gone (or is not a TOC) reads the layer tar instead."""
    ctx = tmp_path / "ctx"
    (ctx / "big").mkdir(parents=True)
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "small.txt").write_text("one\n")
    (ctx / "big" / "a.bin").write_bytes(os.urandom(4096))
    (ctx / "big" / "b.txt").write_text("b\n")
    home = tmp_path / "home"
    lbuild("build", ctx, "--output", f"type=oci,dest={tmp_path / 'o1'}", home=home)
    blobs = home / "blobs" / "sha256"
    tocs = [p for p in blobs.iterdir() if p.read_bytes()[:8] == b'{"toc":1']
    assert len(tocs) >= 3  # one per layer written
    for i, p in enumerate(tocs):
        p.chmod(0o644)
        if i % 2:
            p.unlink()
        else:
            p.write_bytes(b"not a table of contents")
    (ctx / "small.txt").write_text("two\n")
    lbuild("build", ctx, "--output", f"type=oci,dest={tmp_path / 'o2'}", home=home)
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'ref'}", home=home)
    assert manifest_digest(tmp_path / "o2") == manifest_digest(tmp_path / "ref")
