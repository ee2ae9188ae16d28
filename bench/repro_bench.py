"""Benchmark of ``lbuild repro-check`` and ``lbuild diff`` (issue 14).

    python3 bench/repro_bench.py [--rounds 3] [--work DIR]

1. repro-check with the default variations on the cache benchmark's app context (about 2,000
   files, 40 MiB, three stages; ``bench/scenario.py`` without the --jobs heavy files) against
   one cold build of the same context (a fresh home, the same base image): A B A B, medians.
   Goal: repro-check <= 2.3x one cold build.  Also without the clock variation (its 2 s
   stagger is a fixed cost) and without the umask one (the app's COPY steps keep the checkout's
   modes, so the default check finds every file differing and diffs every layer; without it the
   two images are equal and the comparison is one digest).
2. The same context with a RUN step after the COPY steps (``run_bench.RUN_DOCKERFILE``, on the
   busybox base): one cold build, repro-check with the default variations and without the
   clock one.  The clock variation holds each RUN step of the second build back until the
   first build's same step is 2 s old, so a build whose RUN comes early pays about 2 s more.
3. ``lbuild diff`` of two 2,000-file images whose every layer differs (the app image built with
   SOURCE_DATE_EPOCH=0 and =1: every file's mtime differs, so every tar is streamed and every
   file compared).  Goal: <= 1 s.  The whole command (interpreter start included) and the
   in-process comparison are both timed.

The page cache is not dropped (that would disturb whatever else runs on the machine): both
sides of every ratio run warm.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scenario import ScenarioSpec, generate  # noqa: E402


CPU: dict[str, list[float]] = {}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def lbuild(*args: str | Path, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
           label: str = "") -> float:
    """Wall seconds of one lbuild command; its CPU seconds (with every process it waited for)
    go to CPU[label]."""
    e = dict(os.environ)
    e.pop("SOURCE_DATE_EPOCH", None)
    e.update(env or {})
    c0 = _children_cpu()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "builder", *map(str, args)], env=e,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    CPU.setdefault(label, []).append(_children_cpu() - c0)
    if p.returncode not in ok or (args[0] == "repro-check" and "reproducible:" not in p.stdout):
        raise SystemExit(f"lbuild {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path)
    ns = ap.parse_args()
    work = ns.work or Path(tempfile.mkdtemp(prefix="repro-bench-"))
    s = generate(work / "scenario", ScenarioSpec(heavy_files=0))
    home = work / "home"
    lbuild("build", s.base_context, "-t", "base", "--home", home)
    base = work / "base-layout"
    lbuild("build", s.base_context, "--home", home, "-o", f"type=oci,dest={base}")
    ctx_arg = ["--build-context", f"base=oci-layout://{base}:latest"]

    cold, repro, repro_noclock, repro_noumask = [], [], [], []
    run_cold, run_repro, run_noclock = [], [], []
    from run_bench import RUN_DOCKERFILE

    (s.context / "run.Dockerfile").write_text(RUN_DOCKERFILE)
    bb_ctx, bb = work / "busybox", work / "busybox-layout"
    subprocess.run(["sh", str(ROOT / "fixtures/busybox/prepare-context.sh"), str(bb_ctx)],
                   check=True)
    lbuild("build", bb_ctx, "--home", work / "bbhome", "-o", f"type=oci,dest={bb}")
    run_arg = ["-f", s.context / "run.Dockerfile", "--build-context",
               f"base=oci-layout://{bb}:latest"]
    for r in range(ns.rounds):
        fresh = work / f"cold-{r}"
        cold.append(lbuild("build", *ctx_arg, "--home", fresh, "-o",
                           f"type=oci,dest={work / f'cold-out-{r}'}", s.context, label="cold"))
        repro.append(lbuild("repro-check", "--home", home, s.context, ok=(0, 1), label="repro"))
        repro_noclock.append(lbuild("repro-check", "--home", home, "--variations", "all,-clock",
                                    s.context, ok=(0, 1), label="noclock"))
        repro_noumask.append(lbuild("repro-check", "--home", home, "--variations", "all,-umask",
                                    s.context, ok=(0,), label="noumask"))
        run_cold.append(lbuild("build", *run_arg, "--home", work / f"run-cold-{r}", "-o",
                               f"type=oci,dest={work / f'run-cold-out-{r}'}", s.context,
                               label="run-cold"))
        run_repro.append(lbuild("repro-check", *run_arg, s.context, ok=(1,), label="run-repro"))
        run_noclock.append(lbuild("repro-check", *run_arg, "--variations", "all,-clock",
                                  s.context, ok=(1,), label="run-noclock"))
    a, b = work / "img-a", work / "img-b"
    lbuild("build", *ctx_arg, "--home", work / "ha", "-o", f"type=oci,dest={a}", s.context,
           env={"SOURCE_DATE_EPOCH": "0"})
    lbuild("build", *ctx_arg, "--home", work / "hb", "-o", f"type=oci,dest={b}", s.context,
           env={"SOURCE_DATE_EPOCH": "1"})
    diff_cmd = [lbuild("diff", a, b, ok=(1,), label="diff") for _ in range(5)]
    from builder.compare.diff import diff_images
    from builder.compare.source import open_image

    inproc, inproc_cpu = [], []
    for _ in range(5):
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = diff_images(open_image(str(a)), open_image(str(b)))
        inproc.append(time.perf_counter() - t0)
        inproc_cpu.append(time.process_time() - c0)
    files = sum(len(ld.files) for ld in res.layers)

    med = statistics.median
    print(f"context: {s.small_files} small files, {s.context_bytes / (1 << 20):.0f} MiB; "
          f"{ns.rounds} rounds, medians; load {os.getloadavg()[0]:.2f}")
    cpu = {k: med(v) for k, v in CPU.items()}
    print("| measure | wall s | ratio | CPU s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| one cold build (fresh home) | {med(cold):.2f} | 1.00x | {cpu['cold']:.2f} | 1.00x |")
    for name, xs, key in (
        ("repro-check, default variations (2 builds; differs: checkout umask)", repro, "repro"),
        ("repro-check, all but clock", repro_noclock, "noclock"),
        ("repro-check, all but umask (reproducible)", repro_noumask, "noumask"),
    ):
        print(f"| {name} | {med(xs):.2f} | {med(xs) / med(cold):.2f}x | {cpu[key]:.2f} | "
              f"{cpu[key] / cpu['cold']:.2f}x |")
    print(f"| with a RUN step: one cold build (fresh home) | {med(run_cold):.2f} | 1.00x | "
          f"{cpu['run-cold']:.2f} | 1.00x |")
    for name, xs, key in (
        ("with a RUN step: repro-check, default variations", run_repro, "run-repro"),
        ("with a RUN step: repro-check, all but clock", run_noclock, "run-noclock"),
    ):
        print(f"| {name} | {med(xs):.2f} | {med(xs) / med(run_cold):.2f}x | {cpu[key]:.2f} | "
              f"{cpu[key] / cpu['run-cold']:.2f}x |")
    print(f"| lbuild diff, 2 images x {len(res.a.layers)} layers, {files} files differ (command) "
          f"| {med(diff_cmd):.2f} | | {cpu['diff']:.2f} | |")
    print(f"| the same comparison in process | {med(inproc):.2f} | | {med(inproc_cpu):.2f} | |")
    print(f"\nraw: cold {cold}, repro {repro}, repro-no-clock {repro_noclock}, "
          f"repro-no-umask {repro_noumask}, run-cold {run_cold}, run-repro {run_repro}, "
          f"run-repro-no-clock {run_noclock}, diff {diff_cmd}, in-process {inproc}")


if __name__ == "__main__":
    main()
