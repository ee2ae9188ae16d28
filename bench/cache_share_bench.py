"""Shared-cache benchmark (issue 13): a fresh home's first build from a registry cache.

The copyheavy-like scenario of bench/scenario.py (about 2,000 files, 36 MB, three stages),
its base image in a loopback `docker-registry`.  An earlier build warms a cache in the same
registry for each builder: lbuild with ``--cache-to type=registry,ref=…,mode=max``, buildah 1.28
with ``build --layers --cache-to REPO``.  Then, alternating in each round (medians of
``--runs``), each builder builds a copy of the context at another path in an empty home /
empty storage from that cache, into its local store (lbuild ``-t``, buildah's storage):

- lbuild: ``lbuild build --cache-from type=registry,ref=… -t app CTX``;
- buildah: ``buildah build --layers --cache-from REPO --cache-to REPO -t app CTX``.

Also measured, for the second goal: lbuild's own local no-op rebuild in a warm home, and the
time to download what the build needs (the base image, ``lbuild pull``) in a fresh home.

    python bench/cache_share_bench.py --runs 5 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from cache_bench import Buildah  # noqa: E402
from registry_server import start_registry  # noqa: E402
from scenario import buildah_variant, generate  # noqa: E402


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    return dt


def lbuild(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "builder", *args, "--home", str(home)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cache-share-bench-"))
    reg = start_registry(work / "registry")
    env = dict(os.environ, SOURCE_DATE_EPOCH="0")
    res: dict[str, Any] = {"runs": args.runs}
    peers: list[Buildah] = []
    try:
        s = generate(work / "scn")
        base_ref = f"{reg.host}/bench/base:latest"
        timed(lbuild(work / "hbase", "build", str(s.base_context), "--output",
                     f"type=oci,dest={work / 'base'}"), env=env)
        timed(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{work / 'base'}:latest",
               f"docker://{base_ref}"])
        text = s.dockerfile.read_text().replace("FROM base", f"FROM {base_ref}")
        s.dockerfile.write_text(text)
        bdf = s.context / "buildah.Dockerfile"
        bdf.write_text(buildah_variant(text, base_ref))
        lcache = f"{reg.host}/bench/lcache:main"
        bcache = f"{reg.host}/bench/bcache"
        # warm both caches once
        timed(lbuild(work / "hwarm", "build", str(s.context), "-t", "app",
                     "--cache-to", f"type=registry,ref={lcache},mode=max"), env=env)
        warm_peer = Buildah(work / "bwarm")
        peers.append(warm_peer)
        timed(["buildah", "build", "--isolation", "chroot", "--tls-verify=false", "--layers",
               "--timestamp", "0", "--cache-to", bcache, "-f", str(bdf), "-t", "app",
               str(s.context)], env={**warm_peer.env})
        lb, bh, noop, download = [], [], [], []
        for i in range(args.runs):
            ctx = work / f"copy{i}"
            shutil.copytree(s.context, ctx, symlinks=True)
            lb.append(timed(lbuild(work / f"h{i}", "build", str(ctx), "-t", "app",
                                   "--cache-from", f"type=registry,ref={lcache}"), env=env))
            peer = Buildah(work / f"b{i}")
            peers.append(peer)
            bh.append(timed(["buildah", "build", "--isolation", "chroot", "--tls-verify=false",
                             "--layers", "--timestamp", "0", "--cache-from", bcache,
                             "--cache-to", bcache, "-f", str(ctx / "buildah.Dockerfile"),
                             "-t", "app", str(ctx)], env=peer.env))
            noop.append(timed(lbuild(work / "hwarm", "build", str(s.context), "-t", "app"),
                              env=env))
            download.append(timed(lbuild(work / f"hp{i}", "pull", base_ref), env=env))
        res.update(
            lbuild_from_cache_s=statistics.median(lb),
            buildah_from_cache_s=statistics.median(bh),
            ratio=statistics.median(bh) / statistics.median(lb),
            lbuild_noop_s=statistics.median(noop),
            base_download_s=statistics.median(download),
            budget_s=2 * statistics.median(noop) + statistics.median(download),
            all={"lbuild": lb, "buildah": bh, "noop": noop, "download": download},
        )
    finally:
        for p in peers:
            p.destroy()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
