"""Shared-cache benchmark (issue 13): a fresh home's first build from a registry cache.

The copyheavy-like scenario of bench/scenario.py (about 2,000 files, 36 MB, three stages),
its base image in a loopback `docker-registry`.  An earlier build warms a cache in the same
registry for each builder: lbuild with ``--cache-to type=registry,ref=…,mode=max``, buildah 1.28
with ``build --layers --cache-to REPO``.  Then, alternating in each round (medians of
``--runs``), each builder builds a copy of the context at another path in an empty home /
empty storage from that cache, into its local store (lbuild ``-t``, buildah's storage):

- lbuild: ``lbuild build --cache-from type=registry,ref=… -t app CTX``;
- buildah: ``buildah build --layers --cache-from REPO --cache-to REPO -t app CTX``.

Both end with a whole image in their local store: buildah pulls the cached layers into its
storage, lbuild fetches the compressed layer blobs the tagged image names (it does not
decompress them: nothing in the build needs their bytes).

The second goal is "lbuild's time <= 2 x its local no-op + the time to download the blobs the
output needs".  What is counted as that download:

- **which blobs**: exactly the ones the from-cache build fetches, observed, not assumed: one
  more from-cache build (not timed) runs through a recording proxy (tests/registry_server.py's
  ``FaultProxy``) and its GET requests are the list: the base image's manifest, config and
  layer; the cache artifact's manifest and records blob; the app's compressed layer blobs.
  The bench fails if that build fetched a blob twice or was not all cache hits.
- **how**: with lbuild's own registry client (``cache.registry``: one ``Transport``, blobs 8
  at a time, each streamed into a fresh content store's ingest, which verifies its sha256 and
  fsyncs it), in a fresh process and a fresh home, manifests first, then every blob.
  ``download_s`` is that process's wall time, interpreter start and client import included,
  as ``lbuild pull`` would pay them (the budget); ``download_inner_s`` is the time from its
  first request to its last blob committed (the budget with it is printed as ``budget_strict_s``).

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


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    return run(cmd, env, cwd)[0]


def run(cmd: list[str], env: dict[str, str] | None = None,
        cwd: Path | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}")
    return dt, p.stdout + p.stderr


def lbuild(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "builder", *args, "--home", str(home)]


def observe_fetches(host: str, ctx: Path, lcache: str, work: Path,
                    env: dict[str, str]) -> dict[str, Any]:
    """The GETs of one from-cache build, through a recording proxy (not timed)."""
    from registry_server import FaultProxy

    proxy = FaultProxy(host).start()
    try:
        copy = work / "observed-ctx"
        shutil.copytree(ctx, copy, symlinks=True)
        df = copy / "Dockerfile"
        df.write_text(df.read_text().replace(host, proxy.host))
        _, out = run(lbuild(work / "h-observed", "build", str(copy), "-t", "app", "--cache-from",
                            f"type=registry,ref={lcache.replace(host, proxy.host)}"), env=env)
    finally:
        proxy.stop()
    if "14/14 steps cached" not in out:
        raise SystemExit(f"the observed build was not all cached:\n{out[-1500:]}")
    manifests, blobs = [], []
    for method, path, _ in proxy.log:
        if method != "GET" or not path.startswith("/v2/"):
            continue
        name, kind, ref = path[4:].rsplit("/", 2)
        (manifests if kind == "manifests" else blobs).append((name, ref))
    if len({d for _, d in blobs}) != len(blobs):
        raise SystemExit(f"the from-cache build fetched a blob twice: {blobs}")
    return {"manifests": manifests, "blobs": blobs}


def fetch_main(home: Path, host: str, spec_file: Path) -> int:
    """``--fetch``: download exactly the observed manifests and blobs with lbuild's client
    into a fresh content store; print the inner time, blob count and bytes as JSON."""
    from concurrent.futures import ThreadPoolExecutor

    from cache.registry.client import Repository
    from cache.registry.reference import parse
    from cache.registry.transport import Transport
    from cache.store.blobs import BlobStore
    from cache.types import Digest

    spec = json.loads(spec_file.read_text())
    t0 = time.perf_counter()
    store = BlobStore(home)
    sizes: dict[str, int] = {}
    with Transport(host) as t:
        repos: dict[str, Repository] = {}

        def repo(name: str) -> Repository:
            return repos.setdefault(name, Repository(t, parse(f"{host}/{name}:latest")))

        for name, ref in spec["manifests"]:
            body = repo(name).get_manifest(ref).json()
            for d in [body.get("config"), *body.get("layers", []), *body.get("manifests", [])]:
                if d:
                    sizes[d["digest"]] = d["size"]

        def one(item: list[str]) -> None:
            name, digest = item
            with store.ingest(Digest(digest)) as w:  # verified (sha256) and fsynced
                repo(name).fetch_blob(digest, sizes[digest], w, verify=False)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, spec["blobs"]))
    inner = time.perf_counter() - t0
    print(json.dumps({"inner_s": inner, "blobs": len(spec["blobs"]),
                      "bytes": sum(sizes[d] for _, d in spec["blobs"])}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--fetch", nargs=3, metavar=("HOME", "HOST", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fetch:
        return fetch_main(Path(args.fetch[0]), args.fetch[1], Path(args.fetch[2]))
    from cache_bench import Buildah
    from registry_server import start_registry
    from scenario import buildah_variant, generate

    work = Path(tempfile.mkdtemp(prefix="cache-share-bench-"))
    reg = start_registry(work / "registry")
    # this checkout's lbuild, whatever the editable install points at
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, SOURCE_DATE_EPOCH="0", PYTHONPATH=path)
    res: dict[str, Any] = {"runs": args.runs, "load_before": os.getloadavg()}
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
        fetched = observe_fetches(reg.host, s.context, lcache, work, env)
        spec = work / "fetched.json"
        spec.write_text(json.dumps(fetched))
        lb, bh, noop, download, inner = [], [], [], [], []
        size: dict[str, Any] = {}
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
            dt, out = run([sys.executable, str(Path(__file__).resolve()), "--fetch",
                           str(work / f"hd{i}"), reg.host, str(spec)], env=env, cwd=ROOT)
            size = json.loads(out.strip().splitlines()[-1])
            download.append(dt)
            inner.append(size["inner_s"])
        med = statistics.median
        res.update(
            lbuild_from_cache_s=med(lb),
            buildah_from_cache_s=med(bh),
            ratio=med(bh) / med(lb),
            lbuild_noop_s=med(noop),
            download_s=med(download),
            download_inner_s=med(inner),
            budget_s=2 * med(noop) + med(download),
            budget_strict_s=2 * med(noop) + med(inner),
            fetched={"manifests": len(fetched["manifests"]), "blobs": size["blobs"],
                     "bytes": size["bytes"]},
            all={"lbuild": lb, "buildah": bh, "noop": noop, "download": download,
                 "download_inner": inner},
            load_after=os.getloadavg(),
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
