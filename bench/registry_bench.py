"""Registry benchmark: lbuild's pull and push against ``skopeo copy`` on a loopback registry.

A generated image (``--layers`` layers of ``--mb`` MiB in all, incompressible, gzip) is put
into a `docker-registry` on 127.0.0.1 with skopeo, then, alternating lbuild and skopeo in
every round (medians of ``--runs``):

- **cold pull**: lbuild's client (``cache.registry.pull.pull``) into an empty content store,
  against ``skopeo copy docker://REF oci:DIR`` into an empty layout (the same work: fetch
  and verify the compressed blobs).  ``lbuild pull`` (the command: it also decompresses every
  layer into its diff_id blob, as a build needs) is timed beside them;
- **pull of an unchanged digest**: the requests lbuild sends when everything is stored;
- **push with the base in the registry**: an image of the same layers plus one new 4 MiB
  layer, pushed to a repository that already holds the base; lbuild's ``push`` against
  ``skopeo copy oci:DIR docker://REF`` from a layout holding the same image (skopeo's blob
  cache in /var/lib/containers/cache is left as it is; it HEADs blobs as lbuild does);
- with ``--big``: peak RSS of ``lbuild pull`` of one 1 GiB layer (limit 100 MB).

    python bench/registry_bench.py --runs 5 [--big] [--json FILE]
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from registry_server import add_image, start_registry, write_layout  # noqa: E402

from cache.registry.pull import pull  # noqa: E402
from cache.registry.push import push  # noqa: E402
from cache.registry.reference import parse  # noqa: E402
from cache.registry.transport import Transport  # noqa: E402
from cache.store.blobs import BlobStore  # noqa: E402

AMD64 = ("linux", "amd64", "")


def image_layers(n: int, total_mb: int, seed: int) -> list[dict[str, bytes]]:
    import random

    rnd = random.Random(seed)
    size = (total_mb << 20) // n
    return [{f"layer{i}/data.bin": rnd.randbytes(size)} for i in range(n)]


MIDDLE = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
"""A small process between this one and the measured one: a forked child's ru_maxrss starts
from its parent's RSS (this process holds the generated image), so the child is forked from
a process of a few MB."""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of a child process."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", MIDDLE, *cmd], capture_output=True,
                       env=env, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr}")
    return wall, int(p.stdout.strip().splitlines()[-1])


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--big", action="store_true", help="also a 1 GiB layer's peak RSS")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    reg = start_registry(work / "registry")
    results: dict[str, Any] = {"runs": args.runs, "layers": args.layers, "mb": args.mb}
    try:
        lay = work / "image"
        layers = image_layers(args.layers, args.mb, 1)
        desc = add_image(lay, layers)
        write_layout(lay, desc)
        ref = f"{reg.host}/bench/base:latest"
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{lay}:latest",
                        f"docker://{ref}"], check=True)
        lb, sk, cli = [], [], []
        for i in range(args.runs):
            store_dir, oci_dir, home = work / f"s{i}", work / f"o{i}", work / f"h{i}"
            drop_caches()
            t0 = time.perf_counter()
            pull(BlobStore(store_dir), parse(ref), platform=AMD64)
            lb.append(time.perf_counter() - t0)
            drop_caches()
            sk.append(timed(["skopeo", "copy", "-q", "--src-tls-verify=false",
                             f"docker://{ref}", f"oci:{oci_dir}:latest"])[0])
            drop_caches()
            cli.append(timed([sys.executable, "-m", "builder", "pull", ref],
                             env={**os.environ, "LBUILD_HOME": str(home)})[0])
            for d in (store_dir, oci_dir):
                shutil.rmtree(d)
            if i < args.runs - 1:
                shutil.rmtree(home)
        results["cold_pull"] = {"lbuild_client_s": statistics.median(lb),
                                "skopeo_s": statistics.median(sk),
                                "lbuild_pull_cmd_s": statistics.median(cli),
                                "all": {"lbuild": lb, "skopeo": sk, "cmd": cli}}
        # unchanged digest: what is sent when everything is stored
        store = BlobStore(work / "warm")
        pulled = pull(store, parse(ref), platform=AMD64)
        with Transport(reg.host) as t:
            pull(store, parse(ref), platform=AMD64, transport=t)
            tag_requests = list(t.requests)
        with Transport(reg.host) as t:
            pull(store, parse(ref).with_digest(pulled.manifest_digest), platform=AMD64,
                 transport=t)
            digest_requests = list(t.requests)
        results["unchanged"] = {"by_tag": tag_requests, "by_digest": digest_requests}
        # push: base + one new layer to a repository that holds the base
        app = work / "app"
        app_desc = add_image(app, [*layers, {"app/new.bin": os.urandom(4 << 20)}])
        write_layout(app, app_desc)
        app_store = BlobStore(work / "appstore")
        for p in (app / "blobs" / "sha256").iterdir():
            with open(p, "rb") as f:
                app_store.put_stream(f)
        lp, sp, uploads = [], [], []
        for i in range(args.runs):
            # each tool pushes into a repository of its own that already holds the base
            # (put there by skopeo, not timed): only the new layer, config and manifest go up
            for who in ("lb", "sk"):
                subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                f"oci:{lay}:latest", f"docker://{reg.host}/bench/{who}{i}:base"],
                               check=True)
            t0 = time.perf_counter()
            (res,) = push(app_store, app_desc["digest"], [parse(f"{reg.host}/bench/lb{i}:app")])
            lp.append(time.perf_counter() - t0)
            uploads.append(len(res.uploaded))
            sp.append(timed(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                             f"oci:{app}:latest", f"docker://{reg.host}/bench/sk{i}:app"])[0])
        results["push"] = {"lbuild_s": statistics.median(lp), "skopeo_s": statistics.median(sp),
                           "lbuild_uploaded_blobs": uploads, "all": {"lbuild": lp, "skopeo": sp}}
        if args.big:
            big = work / "big"
            bd = add_image(big, [{"big.bin": os.urandom(1 << 30)}])
            write_layout(big, bd)
            bref = f"{reg.host}/bench/big:latest"
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                            f"oci:{big}:latest", f"docker://{bref}"], check=True)
            shutil.rmtree(big)
            wall, rss = timed([sys.executable, "-m", "builder", "pull", bref],
                              env={**os.environ, "LBUILD_HOME": str(work / "bighome")})
            results["big"] = {"seconds": wall, "peak_rss_mb": rss / 1024}
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    big_rss = results.get("big", {}).get("peak_rss_mb", 0)
    return 1 if big_rss >= 100 else 0


if __name__ == "__main__":
    sys.exit(main())
