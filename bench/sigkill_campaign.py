"""SIGKILL campaign (issue 11 item 18): kill ``lbuild build`` at random moments of cold, edit
and RUN builds, and check that nothing is lost.

After every kill:

- the next build (not killed) exits 0 and gives the digest a clean build of the same
  context gives;
- ``lbuild cache verify`` exits 0 (the index passes SQLite's integrity check, every blob
  its hash);
- no mount under the home, no process of the killed build (the index writer child, a RUN
  sandbox), and the home's lock free.

Scenarios (each kill picks one):

- ``cold``: a fresh home, the whole build (COPY, RUN, compression, export);
- ``edit``: a warm home, one file under a COPY after the RUN steps edited (COPY + export);
- ``run``: a warm home, a file the RUN steps read edited (snapshot, RUN, diff, layers).

The kill time is uniform in [0, the scenario's build time measured first]; a build that
finishes before its kill narrows its scenario's window to that delay (load changes).

    python3 bench/sigkill_campaign.py --kills 100 [--seed N] [--work DIR]

Exit status 0 when every kill point passed; the failures are printed with the seed, the
scenario and the kill time (``--seed`` replays a campaign).  ``tests/test_sigkill_sample.py``
runs a few kill points of the same code in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
EPOCH = "1700000000"
sys.path.insert(0, str(ROOT))
from tests.util import epoch_env, layout_build_cmd  # noqa: E402

DOCKERFILE = """\
FROM scratch AS base
COPY busybox /bin/busybox
COPY rootfs/ /
RUN ["/bin/busybox", "--install", "-s", "/bin"]

FROM base
COPY app/ /app/
RUN cat /app/*.txt > /all && mkdir -p /gen && for i in $(seq 1 100); do echo $i > /gen/$i; done
RUN rm -f /app/a0.txt && echo done > /done
COPY data/ /data/
ENV DONE=1
"""

SCENARIOS = ("cold", "edit", "run")


def make_context(root: Path, *, files: int = 40, data_mb: int = 4) -> Path:
    """The campaign's build context: busybox, a small rootfs, app/ (read by RUN), data/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(DOCKERFILE)
    shutil.copyfile(BUSYBOX, root / "busybox")
    os.chmod(root / "busybox", 0o755)
    etc = root / "rootfs" / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    for d, mode in (("tmp", 0o1777), ("root", 0o700)):
        (root / "rootfs" / d).mkdir(exist_ok=True)
        os.chmod(root / "rootfs" / d, mode)
    rng = random.Random(7)
    (root / "app").mkdir(exist_ok=True)
    for i in range(files):
        (root / "app" / f"a{i}.txt").write_text(f"app file {i}\n" * (i + 1))
    (root / "data").mkdir(exist_ok=True)
    for i in range(data_mb):
        (root / "data" / f"d{i}.bin").write_bytes(rng.randbytes(1 << 20))
    return root


def edit(ctx: Path, scenario: str, n: int) -> None:
    """Put the context into variant ``n`` of a scenario (variants are reused: references)."""
    if scenario == "edit":
        (ctx / "data" / "d0.bin").write_bytes(random.Random(n).randbytes(1 << 20))
    elif scenario == "run":
        (ctx / "app" / "a1.txt").write_text(f"edited {n}\n")


def run_build(ctx: Path, home: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        layout_build_cmd(ctx, home, out),
        cwd=ROOT,
        env=epoch_env(EPOCH),
        capture_output=True,
        text=True,
        timeout=600,
    )


def manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def processes_naming(path: Path) -> list[tuple[int, str]]:
    """Live processes whose command line, cwd or root lies under ``path``."""
    prefix = str(path.resolve())
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            places = [cmd]
            for link in ("cwd", "root"):
                with contextlib.suppress(OSError):
                    places.append(os.readlink(f"/proc/{pid}/{link}"))
        except OSError:
            continue  # gone meanwhile
        if any(prefix in p for p in places):
            found.append((pid, cmd.strip()[:200]))
    return found


def lock_free(home: Path) -> bool:
    lock = home / "lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def wait_quiet(home: Path, limit_s: float = 120.0) -> list[str]:
    """Wait for the killed build's children to finish (the index writer applies what it
    received, then exits; that is not a leak) up to ``limit_s``; what is left is reported."""
    deadline = time.monotonic() + limit_s
    while True:
        procs = processes_naming(home)
        if not procs and lock_free(home):
            return []
        if time.monotonic() > deadline:
            return [f"process {pid}: {cmd}" for pid, cmd in procs] + (
                [] if lock_free(home) else ["the home's lock is still held"]
            )
        time.sleep(0.1)


@dataclass
class Campaign:
    work: Path
    seed: int
    log: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    references: dict[tuple[str, int], str] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    variants: int = 3
    scenarios: tuple[str, ...] = SCENARIOS
    files: int = 40
    data_mb: int = 4
    probe: bool = True

    def setup(self) -> None:
        """Context, warm home template, and the clean digest of every variant.

        The warm home is the clean build of variant 0 (the ``cold`` reference).  Every other
        variant's reference is a clean build in a fresh home.  The kill window of a warm
        scenario is the time of that build from the warm home (``probe``), or, without
        probing, of its clean build (longer: some kills then land after the end)."""
        self.ctx = make_context(self.work / "ctx", files=self.files, data_mb=self.data_mb)
        self._reset()
        self.warm = self.work / "warm-home"
        t0 = time.monotonic()
        p = run_build(self.ctx, self.warm, self.work / "warm.oci")
        if p.returncode != 0:
            raise SystemExit(f"reference build failed:\n{p.stderr}")
        self.times["cold"] = time.monotonic() - t0
        self.references[("cold", 0)] = manifest_digest(self.work / "warm.oci")
        for scenario in [x for x in self.scenarios if x != "cold"]:
            for n in range(1, self.variants):
                self._reset()
                edit(self.ctx, scenario, n)
                home = self.work / f"ref-{scenario}-{n}"
                out = self.work / f"ref-{scenario}-{n}.oci"
                t0 = time.monotonic()
                p = run_build(self.ctx, home, out)
                if p.returncode != 0:
                    raise SystemExit(f"reference build failed:\n{p.stderr}")
                spent = time.monotonic() - t0
                self.references[(scenario, n)] = manifest_digest(out)
                shutil.rmtree(home)
                if self.probe:
                    home = self._warm_copy("probe")
                    t0 = time.monotonic()
                    p = run_build(self.ctx, home, self.work / "probe.oci")
                    assert p.returncode == 0, p.stderr
                    spent = time.monotonic() - t0
                    shutil.rmtree(home)
                    shutil.rmtree(self.work / "probe.oci", ignore_errors=True)
                self.times[scenario] = max(self.times.get(scenario, 0.0), spent)
        self._reset()

    def _reset(self) -> None:
        edit(self.ctx, "edit", 0)
        edit(self.ctx, "run", 0)

    def _warm_copy(self, name: str) -> Path:
        home = self.work / f"home-{name}"
        if home.exists():
            shutil.rmtree(home)
        subprocess.run(["cp", "-a", str(self.warm), str(home)], check=True)
        return home

    def kill_point(self, i: int, rng: random.Random) -> None:
        scenario = self.scenarios[i % len(self.scenarios)]
        n = 0 if scenario == "cold" else rng.randrange(1, self.variants)
        self._reset()
        edit(self.ctx, scenario, n)
        home = self.work / f"home-{i}" if scenario == "cold" else self._warm_copy(str(i))
        out = self.work / f"out-{i}.oci"
        delay = rng.uniform(0, self.times[scenario])
        p = subprocess.Popen(
            layout_build_cmd(self.ctx, home, out),
            cwd=ROOT,
            env=epoch_env(EPOCH),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=60)
        if rc == 0:  # the machine is faster than when the window was measured: narrow it
            self.times[scenario] = max(delay, 0.05)
        where = f"seed={self.seed} kill={i} {scenario}/{n} at {delay:.3f}s"
        problems = wait_quiet(home)
        done = run_build(self.ctx, home, out)
        if done.returncode != 0:
            problems.append(f"the build after the kill failed: {done.stderr.strip()[-400:]}")
        elif manifest_digest(out) != self.references[(scenario, n)]:
            problems.append("the build after the kill gave another image")
        v = subprocess.run(
            [sys.executable, "-m", "builder", "cache", "verify", "--home", str(home)],
            cwd=ROOT,
            env=epoch_env(EPOCH),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if v.returncode != 0:
            problems.append(f"cache verify failed: {v.stdout.strip()} {v.stderr.strip()}")
        problems += [f"mount left: {m}" for m in mounts_under(home)]
        problems += wait_quiet(home, limit_s=30.0)
        status = "finished before the kill" if rc == 0 else "killed"
        self.log.append(f"{where}: {status}; " + ("ok" if not problems else "; ".join(problems)))
        if problems:
            self.failures.append(f"{where}: " + "; ".join(problems))
        for m in mounts_under(home):  # leave nothing behind for the next kill point
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def run_campaign(
    work: Path, kills: int, seed: int, *, verbose: bool = False, **options: object
) -> Campaign:
    """Set up and run ``kills`` kill points; ``options`` are Campaign fields (scenarios, ...)."""
    c = Campaign(work, seed, **options)  # type: ignore[arg-type]
    c.setup()
    rng = random.Random(seed)
    for i in range(kills):
        c.kill_point(i, rng)
        if verbose:
            print(c.log[-1], flush=True)
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0 or not BUSYBOX.is_file():
        print("needs root and /bin/busybox (busybox-static)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="lbuild-sigkill-"))
    t0 = time.monotonic()
    c = run_campaign(work, args.kills, seed, verbose=True)
    killed = sum(1 for line in c.log if ": killed;" in line)
    print(
        f"\n{len(c.log)} kill points (seed {seed}), {killed} landed before the build finished; "
        f"build times: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in c.times.items())
        + f"; {time.monotonic() - t0:.0f}s in all"
    )
    if c.failures:
        print(f"{len(c.failures)} FAILED:", *c.failures, sep="\n  ")
        return 1
    print("every kill point passed")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
