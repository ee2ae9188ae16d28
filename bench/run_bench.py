"""Issue 16's benchmark: a one-file edit below a RUN, and cold builds into the store.

The app context is the cache benchmark's (bench/scenario.py: about 2,000 small files, four
10 MiB files), on a base image that has a shell (the busybox image of fixtures/busybox),
with a final stage whose RUN comes after its COPY steps -- the shape of most real
Dockerfiles (``RUN_DOCKERFILE``).  Peers: buildah (``cache_bench.Buildah``: private overlay
storage, ``--layers``), and the classic Docker builder when ``dockerd`` is installed (started
here on a private socket and data root, ``--iptables=false --bridge=none``, as
../shared/PEERS.md says; stopped by its pid).  Builders alternate in every round (A B C A B C).

Scenarios (median of ``--runs``):
- ``edit below RUN``: one line appended to one file under ``COPY --link src/``, then a build
  with the OCI export (lbuild ``-o type=oci``; buildah ``bud`` + ``push``); docker builds
  into its store (it has no OCI export);
- ``edit below RUN, into the store``: the same edit, lbuild ``-t`` with no output, beside
  buildah ``bud`` alone and docker;
- ``cold into the store``: empty lbuild home (the base imported untimed), fresh buildah
  storage (base loaded untimed), docker with the app image and its build cache removed;
- ``cold with OCI export``: lbuild ``-o type=oci`` beside buildah ``bud`` + ``push``.

For the edit it also prints where lbuild's time goes: each step's own time from
``--progress plain`` (the RUN's includes preparing its snapshot) and the layer directories
the edit extracted (``snapshots/overlay/layers``).

With ``--daemon`` every lbuild build is also timed through ``lbuild daemon`` (a resident
fork server, builder/daemon.py; rows ``lbuild (daemon)``, each after an edit of its own, the
peers' ratios given against both).  The daemon stays resident through ``drop_caches`` as
dockerd does: its imported modules are in its memory, not the page cache.

    python bench/run_bench.py [--runs 5] [--no-buildah] [--no-docker] [--daemon] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cache_bench
from cache_bench import (
    BenchError,
    Buildah,
    Measure,
    drop_caches,
    lbuild_env,
    remove_unmounting,
    run,
    run_rss,
)
from scenario import buildah_variant, edit_small_file, generate

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
"""The interpreter lbuild runs in (``--clean-venv``: one without this machine's start-up hooks)."""


def clean_venv(where: Path) -> str:
    """A venv whose only packages are this interpreter's site-packages, named by a plain
    path entry: what lbuild imports is the same, but none of the ``.pth`` start-up hooks
    there run (here: a sandbox's CA injector that imports certifi, and an editable install's
    finder; ~25 ms of every interpreter start, which a user's own venv does not have)."""
    import sysconfig
    import venv

    venv.EnvBuilder(with_pip=False).create(where)
    py = where / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "machine-packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return str(py)

RUN_DOCKERFILE = """\
FROM base AS deps
WORKDIR /opt/deps
COPY deps/ ./

FROM base
ENV APP_HOME=/app LANG=C.UTF-8
WORKDIR /app
COPY --link assets/ /app/assets/
COPY --link data/ /app/data/
COPY --from=deps /opt/deps /app/vendor
COPY --link src/ /app/src/
COPY config/ /app/config/
RUN find /app -type f | wc -l > /app/file-count && chmod 0755 /app/src/main.py
CMD ["/app/src/main.py"]
"""


def started(proc: subprocess.Popen[bytes], ready: Callable[[], bool], tries: int, pause: float) -> bool:
    """Whether a server ``proc`` got ``ready`` within ``tries`` polls ``pause`` seconds apart
    (False as soon as it exits)."""
    for _ in range(tries):
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(pause)
    return False


def lbuild(ctx: Path, home: Path, base: Path, *args: str, daemon: Path | None = None) -> Measure:
    """One ``lbuild build``: in its own process, or with ``daemon`` (a socket) in that
    ``lbuild daemon`` (the command line is the same; its client hands it over)."""
    cmd = [
        PYTHON, "-m", "builder", "build", str(ctx), "--home", str(home),
        "--build-context", f"base=oci-layout://{base}", "--progress", "plain", *args,
    ]  # fmt: skip
    env = lbuild_env(REPO)
    env["LBUILD_DAEMON_SOCKET"] = str(daemon) if daemon is not None else ""
    return run_rss(cmd, env=env, cwd=REPO)


class Daemon:
    """``lbuild daemon`` on a private socket, for the ``lbuild (daemon)`` rows."""

    def __init__(self, root: Path) -> None:
        root.mkdir(mode=0o700, parents=True)
        self.sock = root / "daemon.sock"
        self.log = root / "daemon.log"
        env = lbuild_env(REPO)
        env["LBUILD_DAEMON_SOCKET"] = ""
        out = open(self.log, "wb")  # noqa: SIM115 (lives as long as the daemon)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "builder", "daemon", "--socket", str(self.sock)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        if started(self.proc, lambda: b"listening on" in self.log.read_bytes(), 600, 0.05):
            return
        self.stop()
        raise BenchError(f"lbuild daemon did not start: see {self.log}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def served(self) -> int:
        return sum(1 for ln in self.log.read_text().splitlines() if ": lbuild build" in ln)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def step_times(text: str) -> list[tuple[str, float]]:
    """(step, seconds) of every step that ran (not cached) in a plain progress log."""
    out = []
    for m in re.finditer(r"^\[([^\]]+)\] (.*?) DONE ([0-9.]+)s$", text, re.M):
        out.append((f"[{m.group(1)}] {m.group(2)[:60]}", float(m.group(3))))
    return out


class Docker:
    """The classic builder of Debian's docker.io, on a private socket and data root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.sock = root / "docker.sock"
        self.env = dict(os.environ, DOCKER_HOST=f"unix://{self.sock}", DOCKER_BUILDKIT="0")
        log = open(root / "dockerd.log", "wb")  # noqa: SIM115 (lives as long as the daemon)
        self.proc = subprocess.Popen(
            [
                "dockerd", "--iptables=false", "--bridge=none", "--storage-driver=overlay2",
                "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                "--pidfile", str(root / "docker.pid"), "-H", f"unix://{self.sock}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        def answers() -> bool:
            return subprocess.run(["docker", "info"], env=self.env, capture_output=True).returncode == 0

        if started(self.proc, answers, 300, 0.1):
            return
        self.stop()
        raise BenchError(f"dockerd did not start: see {root / 'dockerd.log'}")

    def load_base(self, layout: Path) -> None:
        tar = self.root / "base.tar"
        run(["skopeo", "copy", "--quiet", f"oci:{layout}:latest",
             f"docker-archive:{tar}:localhost/base:latest"])  # fmt: skip
        run(["docker", "load", "-i", str(tar)], env=self.env)
        tar.unlink()

    def build(self, ctx: Path, dockerfile: Path) -> Measure:
        cmd = ["docker", "build", "-q", "-f", str(dockerfile), "-t", "app:bench", str(ctx)]
        try:
            return run_rss(cmd, env=self.env)
        except BenchError as e:
            # dockerd 20.10's classic builder sometimes loses a fresh container's rootfs
            # ("lchown .../merged/...: no such file or directory"): once more, and say so
            print(f"warning: docker build failed once, retrying: {str(e)[-200:]}", file=sys.stderr)
            return run_rss(cmd, env=self.env)

    def clear(self) -> None:
        subprocess.run(["docker", "rmi", "-f", "app:bench"], env=self.env, capture_output=True)
        subprocess.run(["docker", "image", "prune", "-f"], env=self.env, capture_output=True)
        subprocess.run(["docker", "builder", "prune", "-af"], env=self.env, capture_output=True)

    def stop(self, *, remove: bool = True) -> None:
        """Stop dockerd; its data root goes too unless ``remove`` is False (then the caller
        removes it later with ``remove_unmounting``)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if remove:
            remove_unmounting(self.root)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-buildah", action="store_true")
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--daemon", action="store_true",
                    help="also time each lbuild build through `lbuild daemon` (rows 'lbuild (daemon)')")  # fmt: skip
    ap.add_argument("--clean-venv", action="store_true",
                    help="run lbuild in a venv without this machine's site-packages start-up hooks")  # fmt: skip
    ap.add_argument("--settle", action="store_true",
                    help="sync (untimed) before every timed build of every builder")  # fmt: skip
    a = ap.parse_args(argv)
    cache_bench.SETTLE = a.settle

    work = a.workdir or Path(tempfile.mkdtemp(prefix="lbuild-runbench-"))
    global PYTHON
    if a.clean_venv:
        PYTHON = clean_venv(work / "venv")
    s = generate(work / "scn")
    (s.context / "Dockerfile").write_text(RUN_DOCKERFILE)
    (s.context / "buildah.Dockerfile").write_text(
        buildah_variant(RUN_DOCKERFILE, "localhost/base:latest")
    )
    # The base: the busybox image, built once by lbuild into an OCI layout.
    bb_ctx = work / "busybox"
    subprocess.run(["sh", str(REPO / "fixtures/busybox/prepare-context.sh"), str(bb_ctx)],
                   check=True)  # fmt: skip
    base = work / "base-layout"
    run([sys.executable, "-m", "builder", "build", str(bb_ctx), "--home", str(work / "bbhome"),
         "--output", f"type=oci,dest={base}"], env=lbuild_env(REPO), cwd=REPO)  # fmt: skip

    buildah = None if a.no_buildah or not shutil.which("buildah") else Buildah(work / "buildah")
    docker = None
    if not a.no_docker and shutil.which("dockerd"):
        try:
            docker = Docker(work / "docker")
        except BenchError as e:
            print(f"warning: no docker peer: {e}", file=sys.stderr)
    if buildah is not None:
        buildah.load_base(base)
    if docker is not None:
        docker.load_base(base)
    daemon = Daemon(work / "daemon") if a.daemon else None
    sock = daemon.sock if daemon is not None else None
    results: dict[str, dict[str, list[float]]] = {}
    profile: list[list[tuple[str, float]]] = []
    extracted: list[int] = []

    def dock(scn: str, who: str) -> None:
        """A docker build; a second failure drops the docker peer for the rest of the run."""
        nonlocal docker
        if docker is None:
            return
        try:
            add(scn, who, docker.build(s.context, s.context / "buildah.Dockerfile"))
        except BenchError as e:
            print(f"warning: docker peer dropped: {str(e)[-300:]}", file=sys.stderr)
            notes.append(f"docker dropped during '{scn}': its build failed twice")
            docker.stop()
            docker = None

    notes: list[str] = []

    def add(scn: str, who: str, m: Measure) -> None:
        results.setdefault(scn, {}).setdefault(who, []).append(m.seconds)
        results[scn].setdefault(who + " rss", []).append(m.rss_mb)

    home = work / "home"
    prime = work / "prime"  # imports the base image into a fresh home (untimed)
    prime.mkdir()
    (prime / "Dockerfile").write_text("FROM base\nENV PRIMED=1\n")
    state: dict[str, bool] = {}
    # What the cold runs leave (lbuild homes and layouts, buildah's storage, dockerd's data
    # root) is removed after the last timed build, not between them: on ext4 without a
    # journal (this machine's root), inodes freed in the last 60-300 s are skipped by the
    # inode allocator one by one, and a cold build right after a removal of thousands of
    # files spent up to 0.5 s more creating its files (bench/README.md).
    later: list[Callable[[], None]] = []
    try:
        # warm every builder once (not timed)
        lbuild(s.context, home, base, "-o", f"type=oci,dest={work / 'out-l'}")
        if sock is not None:
            edit_small_file(s, f"w-{time.time_ns()}")
            lbuild(s.context, home, base, "-o", f"type=oci,dest={work / 'out-l'}", daemon=sock)
        if buildah is not None:
            buildah.build(s.context, s.context / "buildah.Dockerfile", work / "out-b")
        dock("warm-up", "docker")
        results.pop("warm-up", None)
        layers = home / "snapshots/overlay/layers"
        for i in range(a.runs):
            edit_small_file(s, f"e{i}-{time.time_ns()}")
            before = len(list(layers.iterdir())) if layers.is_dir() else 0
            shutil.rmtree(work / "out-l", ignore_errors=True)
            m = lbuild(s.context, home, base, "-o", f"type=oci,dest={work / 'out-l'}")
            add("edit below RUN (OCI export)", "lbuild", m)
            profile.append(step_times(m.note))
            extracted.append((len(list(layers.iterdir())) if layers.is_dir() else 0) - before)
            if sock is not None:
                edit_small_file(s, f"d{i}-{time.time_ns()}")
                shutil.rmtree(work / "out-l", ignore_errors=True)
                add("edit below RUN (OCI export)", "lbuild (daemon)",
                    lbuild(s.context, home, base, "-o", f"type=oci,dest={work / 'out-l'}",
                           daemon=sock))  # fmt: skip
            if buildah is not None:
                shutil.rmtree(work / "out-b", ignore_errors=True)
                add("edit below RUN (OCI export)", "buildah",
                    buildah.build(s.context, s.context / "buildah.Dockerfile", work / "out-b"))
            dock("edit below RUN (OCI export)", "docker (store)")
            edit_small_file(s, f"s{i}-{time.time_ns()}")
            add("edit below RUN, into the store", "lbuild",
                lbuild(s.context, home, base, "-t", "app:bench"))
            if sock is not None:
                edit_small_file(s, f"t{i}-{time.time_ns()}")
                add("edit below RUN, into the store", "lbuild (daemon)",
                    lbuild(s.context, home, base, "-t", "app:bench", daemon=sock))
            dock("edit below RUN, into the store", "docker")
        cold_root = work / "cold"
        later.append(lambda: shutil.rmtree(cold_root, ignore_errors=True))
        for i in range(a.runs):
            # each cold build in a home, layout or storage of its own (see ``later``)
            runs = [("cold into the store", "lbuild", ("-t", "app:bench"), None),
                    ("cold with OCI export", "lbuild", ("-o", "type=oci,dest={out}"), None)]  # fmt: skip
            if sock is not None:
                runs += [(scn, "lbuild (daemon)", out, sock) for scn, _, out, _ in runs]
            for n, (scn, who, out, via) in enumerate(runs):
                cold = cold_root / f"{i}-{n}"
                args = [x.format(out=cold / "oci") for x in out]
                # the base image imported untimed: what buildah and docker get too
                lbuild(prime, cold / "home", base, "-t", "primed")
                drop_caches(state)
                add(scn, who, lbuild(s.context, cold / "home", base, *args, daemon=via))
            if buildah is not None:
                later.append(buildah.destroy)
                buildah = Buildah(cold_root / f"{i}-buildah")
                buildah.load_base(base)
                drop_caches(state)
                out_b = cold_root / f"{i}-out-b"
                m = buildah.build(s.context, s.context / "buildah.Dockerfile", out_b)
                add("cold with OCI export", "buildah", m)
                add("cold into the store", "buildah (bud)", Measure(m.seconds - m.export, 0.0))
            if docker is not None:
                docker.stop(remove=False)
                later.append(lambda root=docker.root: remove_unmounting(root))
                try:
                    docker = Docker(cold_root / f"{i}-docker")
                    docker.load_base(base)
                except BenchError as e:
                    print(f"warning: docker peer dropped: {str(e)[-300:]}", file=sys.stderr)
                    notes.append("docker dropped: a fresh dockerd for a cold run did not start")
                    docker = None
                drop_caches(state)
                dock("cold into the store", "docker")
        if daemon is not None:
            served = daemon.served()
            expected = sum(len(by.get("lbuild (daemon)", [])) for by in results.values())
            if served < expected:
                raise BenchError(f"the daemon ran {served} builds, not {expected}: see {daemon.log}")
            notes.append(f"lbuild daemon: {served} builds served (1 more warm-up), resident "
                         f"{daemon.rss_mb():.0f} MB; its rows' RSS is the client's")  # fmt: skip
    finally:
        if buildah is not None:
            buildah.destroy()
        if docker is not None:
            docker.stop()
        if daemon is not None:
            daemon.stop()
        for remove in reversed(later):  # peers' storage (unmounted first) before the tree
            remove()

    print(f"# run_bench: {a.runs} runs, {s.small_files} small files, "
          f"{s.context_bytes / (1 << 20):.0f} MiB context, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"# lbuild runs in {PYTHON}" + (" (--clean-venv)" if a.clean_venv else "")
          + (", sync before each timed build (--settle)" if a.settle else ""))  # fmt: skip
    for scn, by in results.items():
        refs = [r for r in ("lbuild", "lbuild (daemon)") if by.get(r)]
        print(f"\n## {scn}")
        for who, xs in by.items():
            if who.endswith(" rss"):
                continue
            ratios = "".join(
                f", {med(xs) / med(by[r]):.1f}x {r}" for r in refs if not who.startswith("lbuild")
            )
            rss = med(by.get(who + " rss", []))
            print(f"- {who}: median {med(xs):.3f} s (runs {', '.join(f'{x:.2f}' for x in xs)})"
                  f"{ratios}{f', peak RSS {rss:.0f} MB' if rss else ''}")  # fmt: skip
        if len(refs) == 2:
            print(f"- lbuild (daemon) / lbuild: {med(by[refs[1]]) / med(by[refs[0]]):.2f}")
    for n in notes:
        print(f"\nnote: {n}")
    print("\n## where an edit's time goes (lbuild, the run with the median wall time)")
    walls = results["edit below RUN (OCI export)"]["lbuild"]
    mid = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
    for step, secs in profile[mid]:
        print(f"- {step}: {secs:.3f} s")
    print(f"- layer directories added per edit (one taken over from its previous version"
          f" replaces it: 0): {extracted}")
    if a.json:
        a.json.write_text(json.dumps({"results": results, "profile": profile,
                                      "extracted": extracted}, indent=1))  # fmt: skip
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
