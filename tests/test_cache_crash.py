"""Crash safety: a build killed with SIGKILL at any moment leaves a usable, uncorrupted cache.

The build runs in a subprocess over a context big enough to take a second or two (three
20 MB files and a few hundred small ones); it is killed at random moments, and after each
kill the store is checked (every blob re-hashes to its name, the database passes SQLite's
integrity check, every blob a record names is present: records are written only after
their blobs) and the next build must succeed with the digest of a clean reference build.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.util import ROOT, epoch_env, layout_build_cmd, lbuild, manifest_digest

EPOCH = "1700000000"
ITERATIONS = 10

DOCKERFILE = """\
FROM scratch AS data
COPY big/b0.bin /big/
COPY --link big/b1.bin /big/
COPY small/ /small/
WORKDIR /w

FROM scratch
WORKDIR /app
COPY --from=data /big /big
COPY --link big/b2.bin /app/
COPY small /app/small
COPY --from=data /small/d3 /app/d3
ENV A=1
"""


def make_context(root: Path, rng: random.Random) -> None:
    """Three incompressible 20 MB files and 400 small files in 20 directories."""
    (root / "big").mkdir(parents=True)
    for i in range(3):
        (root / "big" / f"b{i}.bin").write_bytes(rng.randbytes(20 << 20))
    for i in range(400):
        d = root / "small" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * (i % 50 + 1))
    (root / "Dockerfile").write_text(DOCKERFILE)


def corrupt_blobs(blobs_dir: Path) -> list[str]:
    """Files under a ``blobs/sha256`` directory whose sha256 is not their name."""
    bad: list[str] = []
    if not blobs_dir.is_dir():
        return bad
    for p in sorted(blobs_dir.iterdir()):
        if p.name.startswith("."):
            continue  # an export's in-flight temp file, never named by an index
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != p.name:
            bad.append(p.name)
    return bad


def check_store(home: Path) -> None:
    """The store after a crash: no corrupt blob, a sound database, no record without its blobs."""
    assert corrupt_blobs(home / "blobs" / "sha256") == []
    db = home / "lbuild.db"
    if not db.exists():
        return
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    from cache.index.records import Index

    with Index.open(str(db)) as index:
        referenced = index.referenced_blobs()
    # the index writer starts before the store exists: a build killed that early leaves an
    # index and no blobs directory (then no record may name a blob)
    blobs = home / "blobs" / "sha256"
    present = {f"sha256:{p.name}" for p in blobs.iterdir()} if blobs.is_dir() else set()
    missing = sorted(str(d) for d in referenced if str(d) not in present)
    assert missing == [], "records name blobs that were never committed"


def check_layout(out: Path, digest: str, where: str) -> None:
    """An OCI layout whose index names ``digest`` and whose every blob is whole."""
    assert manifest_digest(out) == digest, f"{where}: not the reference image"
    blobs = out / "blobs" / "sha256"
    assert corrupt_blobs(blobs) == []
    manifest = json.loads((blobs / digest.split(":", 1)[1]).read_bytes())
    for d in [manifest["config"]["digest"], *(x["digest"] for x in manifest["layers"])]:
        assert (blobs / d.split(":", 1)[1]).is_file(), d


def has_cache_verify() -> bool:
    p = subprocess.run(
        [sys.executable, "-m", "builder", "cache", "verify", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    return p.returncode == 0


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_sound_cache(tmp_path: Path) -> None:
    seed = int(os.environ.get("LBUILD_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    ctx = tmp_path / "ctx"
    make_context(ctx, random.Random(1))
    env = {"SOURCE_DATE_EPOCH": EPOCH}

    t0 = time.monotonic()
    lbuild(
        "build",
        ctx,
        "--output",
        f"type=oci,dest={tmp_path / 'ref'}",
        "--progress",
        "plain",
        home=tmp_path / "ref-home",
        env=env,
    )
    build_time = time.monotonic() - t0
    reference = manifest_digest(tmp_path / "ref")
    verify = has_cache_verify()

    finished_early = 0
    for i in range(ITERATIONS):
        # a fresh home each time so every kill lands in real work; every other iteration
        # kills twice, so a crash also lands on top of a crashed build's leftovers
        home, out = tmp_path / f"home-{i}", tmp_path / f"out-{i}"
        kills = []
        for _ in range(1 + i % 2):
            delay = rng.uniform(0, build_time)
            p = subprocess.Popen(
                layout_build_cmd(ctx, home, out),
                cwd=ROOT,
                env=epoch_env(EPOCH),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            p.kill()
            rc = p.wait(timeout=60)
            finished_early += rc == 0
            kills.append(round(delay, 3))
            check_store(home)
        where = f"seed={seed} iteration={i} kills at {kills}s"
        done = lbuild(
            "build",
            ctx,
            "--output",
            f"type=oci,dest={out}",
            "--progress",
            "plain",
            home=home,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"{where}: build after the crash failed:\n{done.stderr}"
        check_layout(out, reference, where)
        check_store(home)
        if verify and (i % 3 == 2 or i == ITERATIONS - 1):  # it re-hashes the whole store
            v = lbuild("cache", "verify", home=home, check=False)
            assert v.returncode == 0, f"{where}: cache verify: {v.stdout}{v.stderr}"
    assert finished_early < ITERATIONS, "no kill landed inside a build"
