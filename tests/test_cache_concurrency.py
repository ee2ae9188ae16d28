"""Concurrency: builds sharing one LBUILD_HOME at the same moment all succeed, correctly.

Each round starts two real ``lbuild build`` processes together on one home: the same
Dockerfile twice on a fresh home (both race to create the database and write the same
blobs and records), two Dockerfiles that share a stage and a ``--link`` step, warm and
partly warm homes, and concurrent tags.  Every image must equal a reference built alone
from a fresh home, digest for digest, and unpack with umoci; the shared store must hold no
corrupt blob afterwards.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.util import ROOT, lbuild, manifest_digest, tree, umoci_unpack

EPOCH = "1700000000"

COMMON = """\
FROM scratch AS common
COPY big/ /big/
COPY small/ /small/
WORKDIR /w
"""
DOCKERFILE_A = (
    COMMON
    + """
FROM scratch
COPY --from=common /big /big
COPY --link small/d1 /d1
ENV V=a
"""
)
DOCKERFILE_B = (
    COMMON
    + """
FROM scratch
WORKDIR /b
COPY --from=common /small /small
COPY --link small/d1 /d1
ENV V=b
"""
)


def make_context(root: Path) -> None:
    """Two 2 MB incompressible files, 200 small files, and both Dockerfiles."""
    rng = random.Random(7)
    (root / "big").mkdir(parents=True)
    for i in range(2):
        (root / "big" / f"b{i}.bin").write_bytes(rng.randbytes(2 << 20))
    for i in range(200):
        d = root / "small" / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"small {i}\n" * (i % 30 + 1))
    (root / "Dockerfile.a").write_text(DOCKERFILE_A)
    (root / "Dockerfile.b").write_text(DOCKERFILE_B)


@dataclass(frozen=True)
class Job:
    """One build of a round: which context and Dockerfile, and an optional tag."""

    ctx: Path
    dockerfile: str
    tag: str | None = None


def args_of(job: Job, out: Path) -> list[str]:
    args = [
        "build",
        str(job.ctx),
        "-f",
        str(job.ctx / job.dockerfile),
        "--progress",
        "plain",
        "--output",
        f"type=oci,dest={out}",
    ]
    if job.tag:
        args += ["-t", job.tag]
    return args


def run_together(
    jobs: list[Job], home: Path, outs: list[Path]
) -> list[subprocess.CompletedProcess[str]]:
    """Start every job at once on ``home``; wait for all."""
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH, LBUILD_HOME=str(home))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "builder", *args_of(j, o)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for j, o in zip(jobs, outs, strict=True)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


def sound_store(home: Path) -> None:
    """Every blob re-hashes to its name and the database passes SQLite's integrity check."""
    for p in (home / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, p
    con = sqlite3.connect(home / "lbuild.db")
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()


@pytest.mark.slow
def test_two_builds_sharing_a_home_at_once(tmp_path: Path) -> None:
    ctx1 = tmp_path / "ctx1"
    make_context(ctx1)
    ctx2 = tmp_path / "ctx2"
    shutil.copytree(ctx1, ctx2)
    (ctx2 / "small/d1/f1.txt").write_text("edited, read by both Dockerfiles' shared steps\n")

    refs: dict[tuple[Path, str], str] = {}
    trees: dict[tuple[Path, str], object] = {}
    for ctx in (ctx1, ctx2):
        for dfile in ("Dockerfile.a", "Dockerfile.b"):
            out = tmp_path / f"ref-{ctx.name}-{dfile}"
            lbuild(
                *args_of(Job(ctx, dfile), out),
                home=tmp_path / f"ref-home-{ctx.name}-{dfile}",
                env={"SOURCE_DATE_EPOCH": EPOCH},
            )
            refs[ctx, dfile] = manifest_digest(out)
            trees[ctx, dfile] = tree(umoci_unpack(out, tmp_path / "ref-bundle"))
    assert len(set(refs.values())) == 4, "the four references must differ"

    h1, h2, h3 = tmp_path / "h1", tmp_path / "h2", tmp_path / "h3"
    rounds: list[tuple[Path, list[Job]]] = [
        (h1, [Job(ctx1, "Dockerfile.a"), Job(ctx1, "Dockerfile.a")]),  # fresh home, same steps
        (h2, [Job(ctx1, "Dockerfile.a"), Job(ctx1, "Dockerfile.b")]),  # fresh, shared stage
        (h2, [Job(ctx2, "Dockerfile.a"), Job(ctx2, "Dockerfile.b")]),  # warm but for the edit
        (h2, [Job(ctx1, "Dockerfile.b"), Job(ctx2, "Dockerfile.a")]),  # all hits
        (h3, [Job(ctx2, "Dockerfile.a", "img:x"), Job(ctx1, "Dockerfile.b", "img:x")]),  # tags
    ]
    for r, (home, jobs) in enumerate(rounds):
        outs = [tmp_path / f"out-{r}-{i}" for i in range(len(jobs))]
        results = run_together(jobs, home, outs)
        for job, out, res in zip(jobs, outs, results, strict=True):
            where = f"round {r}, {job.ctx.name}/{job.dockerfile}"
            assert res.returncode == 0, f"{where} failed:\n{res.stdout}\n{res.stderr}"
            tag = job.tag.split(":")[1] if job.tag else "latest"
            assert manifest_digest(out, tag) == refs[job.ctx, job.dockerfile], where
            rootfs = umoci_unpack(out, tmp_path / "bundle", tag)
            assert tree(rootfs) == trees[job.ctx, job.dockerfile], where
        sound_store(home)
