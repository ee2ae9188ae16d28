"""Benchmark: latency of ``lbuild watch`` from writing one small file to "image exported".

The scenario is the cache benchmark's (bench/scenario.py: about 2,000 small files in nested
directories, four 10 MiB files, three stages on a base image passed as
``--build-context base=oci-layout://…``) and so is the edit (``edit_small_file``: one file
under ``COPY --link src/`` gets a new last line).  ``lbuild watch --progress json`` runs with
a private home; each edit is timed from just before the write to the arrival of the
watcher's ``rebuild`` line, which is printed after the OCI layout's ``index.json`` has been
replaced (the script checks that it names the reported digest).

Where buildah exists, the same change is built by ``buildah bud --layers`` (layer cache warm,
private storage, ``cache_bench.Buildah``) followed by ``buildah push`` to an OCI layout, on
its own copy of the context, alternating with the lbuild edits (A B A B).

    python bench/watch_latency.py [--edits 20] [--buildah-runs 5] [--write-doc docs/watch.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_bench import Buildah, lbuild_cmd, lbuild_env, run
from scenario import Scenario, edit_small_file, generate

ROOT = Path(__file__).resolve().parent.parent
MARK_BEGIN = "<!-- bench:watch_latency -->"
MARK_END = "<!-- /bench:watch_latency -->"


class Watch:
    """``lbuild watch --progress json`` in a subprocess; events timed as they arrive."""

    def __init__(self, s: Scenario, home: Path, out: Path, base: Path, extra: list[str]) -> None:
        self.out = out
        cmd = lbuild_cmd(s.context, home, out, base=base)
        cmd[cmd.index("build")] = "watch"
        cmd[cmd.index("--progress") + 1] = "json"
        self.proc = subprocess.Popen(
            [*cmd, *extra],
            cwd=ROOT,
            env=lbuild_env(ROOT),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.events: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put((time.monotonic(), json.loads(line)))

    def rebuild(self, timeout: float = 300) -> tuple[float, dict[str, Any]]:
        """The next ``rebuild`` event and when it arrived."""
        end = time.monotonic() + timeout
        while True:
            try:
                t, ev = self.events.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise SystemExit(f"no rebuild from lbuild watch in {timeout}s") from None
            if ev["event"] == "rebuild":
                if not ev["ok"]:
                    raise SystemExit(f"lbuild watch: build failed: {ev['error']}")
                return t, ev

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def layout_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
    return (
        f"median {statistics.median(xs):.3f} s, p90 {p90:.3f} s, "
        f"min {xs[0]:.3f} s, max {xs[-1]:.3f} s (n={len(xs)})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--buildah-runs", type=int, default=5, help="0 skips buildah")
    ap.add_argument("--debounce", type=int, help="--debounce MS for lbuild watch")
    ap.add_argument("--write-doc", type=Path, help="replace the results block in this file")
    ap.add_argument(
        "--run",
        action="store_true",
        help="issue 16's shape: a RUN after the edited COPY (run_bench.RUN_DOCKERFILE, on the "
        "busybox base)",
    )
    args = ap.parse_args(argv)
    if args.edits < 20:
        print("note: the issue asks for a median of at least 20 edits", file=sys.stderr)
    extra = ["--debounce", str(args.debounce)] if args.debounce is not None else []

    work = Path(tempfile.mkdtemp(prefix="lbuild-bench-watch."))
    w: Watch | None = None
    bah: Buildah | None = None
    lat: list[float] = []
    inner: list[float] = []  # the build itself, as the watcher timed it
    bah_total: list[float] = []
    bah_push: list[float] = []
    try:
        s = generate(work / "scenario")
        base = work / "base-oci"
        base_ctx = s.base_context
        if args.run:
            from run_bench import RUN_DOCKERFILE
            from scenario import buildah_variant

            (s.context / "Dockerfile").write_text(RUN_DOCKERFILE)
            (s.context / "buildah.Dockerfile").write_text(
                buildah_variant(RUN_DOCKERFILE, "localhost/base:latest")
            )
            base_ctx = work / "busybox"
            prepare = ROOT / "fixtures/busybox/prepare-context.sh"
            subprocess.run(["sh", str(prepare), str(base_ctx)], check=True)
        run(lbuild_cmd(base_ctx, work / "base-home", base), env=lbuild_env(ROOT), cwd=ROOT)
        w = Watch(s, work / "home", work / "out", base, extra)
        _, first = w.rebuild()
        print(f"initial build: {first['seconds']:.2f} s, {first['steps']} steps", file=sys.stderr)

        bs: Scenario | None = None
        if args.buildah_runs and shutil.which("buildah"):
            bctx = work / "buildah-ctx"
            shutil.copytree(s.context, bctx, symlinks=True)
            bs = dataclasses.replace(
                s, context=bctx, edit_file=bctx / s.edit_file.relative_to(s.context)
            )
            bah = Buildah(work / "buildah")
            bah.load_base(base)
            bah.build(bctx, bctx / "buildah.Dockerfile", work / "buildah-out")  # warm its cache

        time.sleep(0.5)
        for i in range(args.edits):
            t0 = time.monotonic()
            edit_small_file(s, f"{os.getpid()}.{i}")
            t1, ev = w.rebuild()
            if layout_digest(w.out) != ev["digest"]:
                raise SystemExit("index.json does not name the reported digest")
            lat.append(t1 - t0)
            inner.append(float(ev["seconds"]))
            print(
                f"edit {i}: {t1 - t0:.3f} s ({ev['rebuilt']} rebuilt, {ev['cached']} cached)",
                file=sys.stderr,
            )
            if bah is not None and bs is not None and i < args.buildah_runs:
                edit_small_file(bs, f"{os.getpid()}.{i}")
                out = work / f"buildah-out-{i}"
                m = bah.build(bs.context, bs.context / "buildah.Dockerfile", out)
                shutil.rmtree(out, ignore_errors=True)
                bah_total.append(m.seconds)
                bah_push.append(m.export)
                print(f"  buildah: {m.seconds:.2f} s ({m.note})", file=sys.stderr)
            time.sleep(0.3)  # idle again before the next edit
    finally:
        if w is not None:
            w.stop()
        if bah is not None:
            bah.destroy()
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    lines = [
        *(["Scenario: a RUN after the edited COPY (`--run`).", ""] if args.run else []),
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; load average {load:.1f} at the end (other "
        "work on the machine inflates every number).",
        "",
        "| what | seconds |",
        "| --- | --- |",
        f"| lbuild watch: write -> image exported | {summary(lat)} |",
        f"| of which the build (`seconds` of the rebuild line) | {summary(inner)} |",
    ]
    if bah_total:
        bud = [t - p for t, p in zip(bah_total, bah_push, strict=True)]
        lines += [
            f"| buildah bud --layers, warm | {summary(bud)} |",
            f"| buildah bud --layers + push to an OCI layout | {summary(bah_total)} |",
            "",
            "Ratio of medians, buildah (bud + push) / lbuild watch: "
            f"{statistics.median(bah_total) / statistics.median(lat):.1f}x "
            f"(bud alone: {statistics.median(bud) / statistics.median(lat):.1f}x).",
        ]
    else:
        lines += ["", "buildah: not measured (not installed, or --buildah-runs 0)."]
    block = "\n".join(lines)
    print(block)
    if args.write_doc:
        text = args.write_doc.read_text()
        start, end = text.index(MARK_BEGIN), text.index(MARK_END)
        args.write_doc.write_text(
            text[: start + len(MARK_BEGIN)] + "\n" + block + "\n" + text[end:]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
