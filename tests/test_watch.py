"""lbuild watch: a real watcher in a subprocess, driven by real file operations.

Every scenario reads the watcher's ``--progress json`` lines and checks the image it exported
(unpacked with umoci), not only that a build happened.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import run_fixtures
from run_fixtures import mount_lines, needs_root, procs_marked
from util import ROOT, manifest_digest, umoci_unpack, write_files

from builder.watch import Change, ChangeFilter, PendingChanges, Rebuild
from cache.index.records import Index

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome

pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/umoci").exists() and not Path("/usr/local/bin/umoci").exists(),
    reason="umoci is needed to check exported images",
)


class WatchProc:
    """``lbuild watch --progress json`` running in a subprocess, its JSON events in a queue."""

    def __init__(
        self, ctx: Path, home: Path, out: Path, *extra: str, prefix: tuple[str, ...] = ()
    ) -> None:
        env = dict(os.environ)
        env["LBUILD_HOME"] = str(home)
        env.pop("SOURCE_DATE_EPOCH", None)
        args = [
            *prefix,
            sys.executable,
            "-m",
            "builder",
            "watch",
            "--progress",
            "json",
            "-o",
            f"type=oci,dest={out}",
            *extra,
            str(ctx),
        ]
        self.out = out
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr: list[str] = []
        self.seen: list[dict[str, Any]] = []  # every event, in order
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            self.seen.append(ev)
            self.events.put(ev)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def next(self, event: str = "rebuild", timeout: float = 60) -> dict[str, Any]:
        """The next event of this type (earlier events of other types are dropped)."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {event!r} event in {timeout}s; stderr:\n" + "".join(self.stderr)
                )
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev["event"] == event:
                return ev

    def quiet(self, seconds: float, event: str = "rebuild") -> None:
        """Assert that no event of this type arrives within ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                return
            assert ev["event"] != event, f"unexpected {event}: {ev}"

    def ok(self, timeout: float = 60) -> dict[str, Any]:
        """The next rebuild, which must have succeeded and be the image now in the output."""
        ev = self.next("rebuild", timeout)
        assert ev["ok"], ev
        assert manifest_digest(self.out) == ev["digest"]
        return ev

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def watcher(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Start watchers (in the test's ``home`` unless told otherwise); kill any left at the end."""
    started: list[WatchProc] = []

    def start(ctx: Path, *extra: str, home_dir: Path | None = None) -> WatchProc:
        h = home_dir if home_dir is not None else request.getfixturevalue("home")
        w = WatchProc(ctx, h, tmp_path / "out", *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


def rootfs(w: WatchProc, tmp_path: Path) -> Path:
    return umoci_unpack(w.out, tmp_path / "bundle")


def files(root: Path) -> dict[str, str]:
    """Every regular file under ``root`` with its text."""
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def make_context(ctx: Path, extra: dict[str, str | bytes] | None = None) -> None:
    write_files(
        ctx,
        {
            "Dockerfile": "FROM scratch\nCOPY static/ /static/\nCOPY app/ /app/\n",
            "static/logo.txt": "logo\n",
            "app/main.py": "print(1)\n",
            "app/lib/util.py": "x = 1\n",
            **(extra or {}),
        },
    )


@pytest.mark.slow
def test_edit_create_delete_rename(tmp_path: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx)
    w = watcher(ctx)
    first = w.ok()
    assert first["initial"] and first["rebuilt"] == 2
    assert files(rootfs(w, tmp_path)) == {
        "static/logo.txt": "logo\n",
        "app/main.py": "print(1)\n",
        "app/lib/util.py": "x = 1\n",
    }

    # Idle: inotify, no polling.
    before = w.cpu_seconds()
    w.quiet(3.0)
    assert w.cpu_seconds() - before < 0.1

    (ctx / "app/main.py").write_text("print(2)\n")
    ev = w.ok()
    assert ev["changed"] == [{"kind": "modified", "path": "app/main.py"}]
    assert (ev["rebuilt"], ev["cached"]) == (1, 1)  # static/ is untouched: a hit
    assert files(rootfs(w, tmp_path))["app/main.py"] == "print(2)\n"

    (ctx / "app/new.py").write_text("new\n")
    ev = w.ok()
    assert {"kind": "created", "path": "app/new.py"} in ev["changed"]
    assert files(rootfs(w, tmp_path))["app/new.py"] == "new\n"

    (ctx / "app/lib/util.py").unlink()
    ev = w.ok()
    assert ev["changed"] == [{"kind": "deleted", "path": "app/lib/util.py"}]
    tree = files(rootfs(w, tmp_path))
    assert "app/lib/util.py" not in tree and (tmp_path / "bundle/rootfs/app/lib").is_dir()

    (ctx / "app/new.py").rename(ctx / "app/renamed.py")
    ev = w.ok()
    assert ev["changed"] == [{"kind": "moved", "path": "app/new.py", "dest": "app/renamed.py"}]
    assert files(rootfs(w, tmp_path)) == {
        "static/logo.txt": "logo\n",
        "app/main.py": "print(2)\n",
        "app/renamed.py": "new\n",
    }

    # An editor's save dance: write a temp file, rename it over the original.
    (ctx / "app/.main.py.swp").write_text("print(3)\n")
    os.replace(ctx / "app/.main.py.swp", ctx / "app/main.py")
    ev = w.ok()
    assert files(rootfs(w, tmp_path))["app/main.py"] == "print(3)\n"
    w.quiet(1.0)  # one save, one rebuild
    assert w.stop() == 0


@pytest.mark.slow
def test_burst_of_1000_files_is_one_rebuild(tmp_path: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx)
    w = watcher(ctx, "--debounce", "400")
    w.ok()
    for i in range(1000):  # what a `git checkout` does
        p = ctx / "app" / f"d{i % 10}" / f"f{i}.txt"
        p.parent.mkdir(exist_ok=True)
        p.write_text(f"{i}\n")
    ev = w.ok()
    assert ev["changed_count"] >= 1000  # files (and their new directories) in one summary
    w.quiet(1.5)
    tree = files(rootfs(w, tmp_path))
    assert sum(1 for k in tree if k.startswith("app/d")) == 1000
    assert tree["app/d7/f417.txt"] == "417\n"
    assert w.stop() == 0


def test_ignored_files_never_build_and_ignore_edits_reselect(tmp_path: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx, {".dockerignore": "app/*.log\napp/cache\n"})
    w = watcher(ctx)
    w.ok()
    (ctx / "app/debug.log").write_text("noise\n")
    (ctx / "app/cache").mkdir()
    (ctx / "app/cache/blob").write_text("noise\n")
    (ctx / "app/debug.log").unlink()
    w.quiet(1.5)

    (ctx / "app/debug.log").write_text("kept\n")
    w.quiet(0.5)
    (ctx / ".dockerignore").write_text("app/cache\n")  # *.log is no longer ignored
    ev = w.ok()
    assert {"kind": "modified", "path": ".dockerignore"} in ev["changed"]
    tree = files(rootfs(w, tmp_path))
    assert tree["app/debug.log"] == "kept\n" and "app/cache/blob" not in tree

    (ctx / "app/debug.log").write_text("kept 2\n")  # the new rules decide now
    w.ok()
    assert files(rootfs(w, tmp_path))["app/debug.log"] == "kept 2\n"
    assert w.stop() == 0


def test_dockerfile_error_keeps_watching_and_fix_rebuilds(tmp_path: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx)
    dockerfile = tmp_path / "df" / "Dockerfile"  # outside the context: watched too
    write_files(dockerfile.parent, {"Dockerfile": "FROM scratch\nCOPY app/ /app/\n"})
    (ctx / "Dockerfile").unlink()
    w = watcher(ctx, "-f", str(dockerfile))
    w.ok()
    good = manifest_digest(w.out)

    dockerfile.write_text("FROM scratch\nCOPPY app/ /app/\n")
    ev = w.next()
    assert not ev["ok"] and "Dockerfile:2" in ev["error"], ev
    assert w.proc.poll() is None
    assert manifest_digest(w.out) == good  # the last good image stays in place

    (ctx / "app/main.py").write_text("print(5)\n")  # still broken: another failure, still alive
    assert not w.next()["ok"]

    dockerfile.write_text("FROM scratch\nCOPY app/ /srv/\n")
    ev = w.ok()
    assert files(rootfs(w, tmp_path)) == {"srv/main.py": "print(5)\n", "srv/lib/util.py": "x = 1\n"}
    assert w.stop() == 0


def test_exec_restarts_and_sigterm_leaves_nothing(tmp_path: Path, home: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx)
    log = tmp_path / "exec.log"  # outside the context, or writing it would trigger builds
    cmd = f'echo "$$ $LBUILD_IMAGE_DIGEST $LBUILD_OUTPUT" >> {log}; exec sleep 600'
    w = watcher(ctx, "--exec", cmd, "--exec-grace", "5")
    first = w.ok()
    w.next("exec")
    pid1, digest1, out1 = _last_exec(log, 1)
    assert digest1 == first["digest"] and Path(out1) == w.out.resolve()
    assert _alive(pid1)

    (ctx / "app/main.py").write_text("print(9)\n")
    second = w.ok()
    stopped = w.next("exec")
    assert stopped["status"] == -signal.SIGTERM  # the old run got SIGTERM and went
    w.next("exec")
    pid2, digest2, _ = _last_exec(log, 2)
    assert digest2 == second["digest"] != digest1 and pid2 != pid1
    assert not _alive(pid1) and _alive(pid2)

    assert w.stop(signal.SIGTERM) == 0
    assert not _alive(pid2)  # the command is stopped with the watcher
    assert list((home / "tmp").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx", "exec.log", "home", "out"]
    assert files(umoci_unpack(w.out, tmp_path / "bundle"))["app/main.py"] == "print(9)\n"


def test_exec_that_ignores_sigterm_is_killed(tmp_path: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    make_context(ctx)
    log = tmp_path / "exec.log"
    cmd = f"trap '' TERM; echo $$ >> {log}; sleep 600"
    w = watcher(ctx, "--exec", cmd, "--exec-grace", "0.5")
    w.ok()
    w.next("exec")
    pid1 = int(_exec_lines(log, 1)[0])
    (ctx / "app/main.py").write_text("print(7)\n")
    w.ok()
    assert w.next("exec")["status"] == "killed"
    assert not _alive(pid1)
    assert files(rootfs(w, tmp_path))["app/main.py"] == "print(7)\n"
    assert w.stop(signal.SIGINT) == 0  # Ctrl-C: a clean stop too


RUN_DOCKERFILE = """\
FROM busybox:test
COPY app/ /app/
RUN sh /app/step.sh
"""


@needs_root
@pytest.mark.slow
def test_change_during_a_build_queues_exactly_one_more(
    tmp_path: Path, bbhome: Path, watcher: Any
) -> None:
    ctx = tmp_path / "ctx"
    # A RUN that sleeps makes the build last long enough to change things during it.
    write_files(ctx, {"Dockerfile": RUN_DOCKERFILE, "app/step.sh": "echo v1 > /result\n"})
    w = watcher(ctx, "--debounce", "50", home_dir=bbhome)
    w.ok(timeout=120)
    (ctx / "app/step.sh").write_text("sleep 2; echo v2 > /result\n")
    while "RUN" not in w.next("step_start")["name"]:
        pass
    for i in range(3):  # three changes, each after its own quiet period
        (ctx / f"app/during{i}.txt").write_text(f"{i}\n")
        time.sleep(0.2)
    slow = w.ok()
    assert [c["path"] for c in slow["changed"]] == ["app/step.sh"]
    queued = w.ok()
    assert sorted(c["path"] for c in queued["changed"]) == [
        "app/during0.txt",
        "app/during1.txt",
        "app/during2.txt",
    ]
    w.quiet(1.0)
    root = rootfs(w, tmp_path)
    assert (root / "app/during2.txt").read_text() == "2\n"
    assert (root / "result").read_text() == "v2\n"
    assert w.stop() == 0


@needs_root
@pytest.mark.slow
def test_failing_run_is_shown_and_its_fix_rebuilds(
    tmp_path: Path, bbhome: Path, watcher: Any
) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": RUN_DOCKERFILE, "app/step.sh": "echo one > /result\n"})
    w = watcher(ctx, home_dir=bbhome)
    w.ok(timeout=120)
    assert (rootfs(w, tmp_path) / "result").read_text() == "one\n"
    good = manifest_digest(w.out)

    (ctx / "app/step.sh").write_text("echo about to fail; exit 3\n")
    ev = w.next()
    assert not ev["ok"]
    assert "Dockerfile:3" in ev["error"] and "exit code 3" in ev["error"], ev
    assert w.proc.poll() is None and manifest_digest(w.out) == good
    logs = "".join(e["data"] for e in w.seen if e["event"] == "log")
    assert "about to fail" in logs  # the command's own output is shown

    (ctx / "app/step.sh").write_text("echo fixed > /result\n")
    ev = w.ok()
    assert (ev["rebuilt"], ev["cached"]) == (2, 0)  # the COPY and the RUN after it
    root = rootfs(w, tmp_path)
    assert (root / "result").read_text() == "fixed\n" and (root / "bin/busybox").is_file()
    assert w.stop() == 0


@needs_root
@pytest.mark.slow
def test_sigterm_during_a_run_aborts_it_cleanly(tmp_path: Path, bbhome: Path, watcher: Any) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": RUN_DOCKERFILE, "app/step.sh": "true\n"})
    w = watcher(ctx, home_dir=bbhome)
    w.ok(timeout=120)
    good = manifest_digest(w.out)
    marker = f"7{os.getpid():07d}"  # a sleep argument no other process has
    (ctx / "app/step.sh").write_text(f"sleep {marker}\n")
    while "RUN" not in w.next("step_start")["name"]:
        pass
    for _ in range(200):  # wait until the sandbox runs the command
        if procs_marked(marker):
            break
        time.sleep(0.05)
    assert procs_marked(marker), "the RUN command never started"
    t0 = time.monotonic()
    assert w.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10  # aborted, not waited for
    assert procs_marked(marker) == []
    assert mount_lines(str(bbhome)) == []
    assert list((bbhome / "tmp").iterdir()) == []
    assert manifest_digest(w.out) == good  # the aborted build exported nothing


def _exec_lines(log: Path, n: int) -> list[str]:
    """The --exec log once it has ``n`` lines (the command writes one right after it starts)."""
    for _ in range(200):
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"the --exec command did not write line {n}")


def _last_exec(log: Path, n: int) -> tuple[int, str, str]:
    pid, digest, out = _exec_lines(log, n)[n - 1].split(" ")
    return int(pid), digest, out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the filter and the pending set, without a process -------------------------------------
def test_filter_names_relevant_paths(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {".dockerignore": "*.log\nbuild\n!build/keep\nout\n", "Dockerfile": ""})
    flt = ChangeFilter(ctx, ctx / "Dockerfile", [ctx / "out", tmp_path / "home"])
    c = str(ctx)
    assert flt.name(f"{c}/src/a.py", is_dir=False) == "src/a.py"
    assert flt.name(f"{c}/x.log", is_dir=False) is None
    assert flt.name(f"{c}/build/obj.o", is_dir=False) is None
    assert flt.name(f"{c}/build/keep", is_dir=False) == "build/keep"
    assert flt.name(f"{c}/build", is_dir=True) == "build"  # "!build/keep" may re-include below
    assert flt.name(f"{c}/out/index.json", is_dir=False) is None  # the output being written
    assert flt.name(f"{c}/.out.abc123.tmp", is_dir=True) is None  # its temporary sibling
    assert flt.name(f"{c}/Dockerfile", is_dir=False) == "Dockerfile"
    assert flt.name(f"{c}/.dockerignore", is_dir=False) == ".dockerignore"
    assert flt.name(f"{tmp_path}/elsewhere", is_dir=False) is None
    (ctx / ".dockerignore").write_text("src\n")
    flt.reload()
    assert flt.name(f"{c}/src/a.py", is_dir=False) is None
    assert flt.name(f"{c}/x.log", is_dir=False) == "x.log"
    (ctx / ".dockerignore").write_text("[\n")  # malformed: nothing excluded, the build says why
    flt.reload()
    assert flt.name(f"{c}/src/a.py", is_dir=False) == "src/a.py"


def test_pending_coalesces_and_summary_line() -> None:
    p = PendingChanges()
    try:
        assert p.quiet_for() is None
        p.add(Change("created", "a"))
        p.add(Change("modified", "a"))
        p.add(Change("modified", "b"))
        p.add(Change("moved", "c", "d"))
        quiet = p.quiet_for()
        assert quiet is not None and quiet >= 0
        changes = p.take()
        assert changes == (
            Change("created", "a"),
            Change("modified", "b"),
            Change("moved", "c", "d"),
        )
        assert p.take() == ()
    finally:
        p.close()
    r = Rebuild(4, (*changes, Change("deleted", "e")), True, 0.25, 5, 4, "sha256:ab")
    assert r.line() == (
        "[watch] #4 changed: +a, ~b, c -> d (+1 more) | 1 rebuilt, 4 cached | 0.25s | sha256:ab"
    )
    bad = Rebuild(5, (Change("modified", "Dockerfile"),), False, 0.01, error="Dockerfile:2: x")
    assert "FAILED" in bad.line() and "Dockerfile:2: x" in bad.line()
    assert bad.as_json()["error"] == "Dockerfile:2: x" and not bad.as_json()["ok"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (.ci/run installs it)")
def test_the_watcher_writes_the_index_itself(tmp_path: Path, home: Path) -> None:
    """A long-lived watcher pays SQLAlchemy's import once: no index writer child per rebuild
    (spawning one each time made every rebuild wait for its 0.25 s import)."""
    ctx = tmp_path / "ctx"
    make_context(ctx)
    log = tmp_path / "execs"
    w = WatchProc(
        ctx,
        home,
        tmp_path / "out",
        prefix=("strace", "-f", "-qq", "-e", "trace=execve", "-o", str(log)),
    )
    try:
        assert w.ok(timeout=120)["initial"]
        (ctx / "app" / "main.py").write_text("print(2)\n")
        assert w.ok(timeout=120)["rebuilt"] == 1
        (ctx / "app" / "main.py").write_text("print(3)\n")
        assert w.ok(timeout=120)["rebuilt"] == 1
    finally:
        # signal the watcher itself (strace's child); strace ends with it
        kids = Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split()
        for pid in kids:
            os.kill(int(pid), signal.SIGTERM)
        assert w.proc.wait(timeout=60) == 0
    execs = [line for line in log.read_text().splitlines() if "execve(" in line]
    assert any("watch" in line for line in execs)  # the trace did see the watcher start
    assert not [line for line in execs if "cache.index.recorder" in line]
    with Index.open(home / "lbuild.db") as index:  # and its writes landed
        assert len(index.list_steps(limit=None, oldest_first=True)) >= 4
