"""``lbuild daemon``: command lines run in a resident fork server behave as in their own
process (output, exit status, working directory, environment, stdin, signals), and only the
daemon's own user with the daemon's own code is served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import run_fixtures
from util import ROOT, write_files

pytestmark = pytest.mark.slow
busybox_home = run_fixtures.busybox_home

CTX = {
    "Dockerfile": "FROM scratch\nARG GREETING=hi\nCOPY a.txt /a.txt\nCOPY dir/ /dir/\nLABEL g=$GREETING\n",
    "a.txt": "alpha\n",
    "dir/b.txt": "beta\n",
}


class Daemon:
    def __init__(self, proc: subprocess.Popen[str], sock: Path, log: Path) -> None:
        self.proc, self.sock, self.log = proc, sock, log

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def ran(self) -> list[str]:
        return [ln for ln in self.lines() if ": lbuild " in ln]


def start_daemon(sock: Path, log: Path, *, pythonpath: Path = ROOT) -> Daemon:
    env = dict(os.environ, PYTHONPATH=str(pythonpath), LBUILD_DAEMON_SOCKET="")
    out = open(log, "w")  # noqa: SIM115 (the daemon's log, kept open for it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "builder", "daemon", "--socket", str(sock)],
        stdout=out, stderr=out, text=True, env=env, cwd=pythonpath,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "listening on" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.05)
    return Daemon(proc, sock, log)


def stop(d: Daemon) -> None:
    if d.proc.poll() is None:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=60)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    d = start_daemon(run_dir / "daemon.sock", tmp_path / "daemon.log")
    yield d
    stop(d)


def cli(
    *args: str, sock: Path | str, cwd: Path, env: dict[str, str] | None = None,
    stdin: str | None = None, timeout: float = 120,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    e = dict(os.environ, PYTHONPATH=str(ROOT), LBUILD_DAEMON_SOCKET=str(sock))
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "builder", *args], capture_output=True, text=True, env=e,
        cwd=cwd, input=stdin, timeout=timeout,
    )  # fmt: skip


def manifest(layout: Path) -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"]
    return {"digest": digest, "index": index}


def test_a_build_in_the_daemon_is_the_build_in_process(daemon: Daemon, tmp_path: Path) -> None:
    """Relative paths (context, --home, -o dest, --iidfile) from the client's directory,
    its environment (SOURCE_DATE_EPOCH, a build arg from the environment), its output and
    exit status: the same image as the same command run in-process."""
    work = tmp_path / "work"
    write_files(work / "ctx", CTX)
    # a value the request must carry byte for byte: non-ASCII, an '=', a tab
    env = {"SOURCE_DATE_EPOCH": "1700000000", "GREETING": "from-env é=ü\tx"}
    args = ("build", "ctx", "--home", "home", "--build-arg", "GREETING", "--progress", "plain")
    via = cli(*args, "-o", "type=oci,dest=out-d", "--iidfile", "iid-d", sock=daemon.sock,
              cwd=work, env=env)  # fmt: skip
    assert via.returncode == 0, via.stderr
    assert len(daemon.ran()) == 1 and daemon.ran()[0].endswith(": lbuild build")
    here = cli(*args, "-o", "type=oci,dest=out-h", "--iidfile", "iid-h", sock="", cwd=work,
               env=env)  # fmt: skip
    assert here.returncode == 0, here.stderr
    assert len(daemon.ran()) == 1  # the second ran in its own process
    # the daemon's child wrote the index itself (no writer process): every step a hit now
    import re

    counts = re.findall(r"(\d+)/(\d+) steps cached", here.stderr + here.stdout)
    assert counts and counts[-1][0] == counts[-1][1] != "0", here.stderr
    assert manifest(work / "out-d")["digest"] == manifest(work / "out-h")["digest"]
    assert (work / "iid-d").read_text() == (work / "iid-h").read_text()
    assert "image sha256:" in via.stderr + via.stdout
    cfg = json.loads(
        subprocess.run(["skopeo", "inspect", "--config", f"oci:{work / 'out-d'}:latest"],
                       capture_output=True, text=True, check=True).stdout
    )  # fmt: skip
    assert cfg["config"]["Labels"] == {"g": "from-env é=ü\tx"}
    assert cfg["created"].startswith("2023-11-14T22:13:20")
    # the command's exit line names the daemon's pid that ran it
    assert any(ln.endswith(": exit 0") for ln in daemon.lines())


def test_the_daemon_is_one_thread(daemon: Daemon, tmp_path: Path) -> None:
    """A fork copies only the forking thread: a daemon with another (a library's, such as
    the Go runtime of BuildKit's parser) would hand every command its locks, held forever.
    After serving a build it is still one thread."""
    work = tmp_path / "work"
    write_files(work / "ctx", CTX)
    assert cli("build", "ctx", "--home", "home", "-q", sock=daemon.sock, cwd=work).returncode == 0
    assert len(daemon.ran()) == 1
    assert os.listdir(f"/proc/{daemon.proc.pid}/task") == [str(daemon.proc.pid)]


def test_errors_exit_codes_and_stdin_come_through(daemon: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "work"
    write_files(work / "ctx", CTX)
    bad = cli("build", "ctx", "--home", "home", "-f", "-", sock=daemon.sock, cwd=work,
              stdin="FROM scratch\nCOPY missing.txt /\n")  # fmt: skip
    assert bad.returncode == 1 or bad.returncode == 2, bad.stderr
    err = bad.stderr.strip().splitlines()
    assert err[-1].startswith("lbuild: error: ") and "missing.txt" in err[-1]
    assert "Traceback" not in bad.stderr
    good = cli("build", "ctx", "--home", "home", "-f", "-", "-q", sock=daemon.sock, cwd=work,
               stdin=CTX["Dockerfile"])  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().startswith("sha256:")
    usage = cli("build", sock=daemon.sock, cwd=work)
    assert usage.returncode == 2 and "usage: lbuild build" in usage.stderr
    assert [ln.rsplit(": ", 1)[1] for ln in daemon.lines() if ": exit " in ln] == [
        f"exit {bad.returncode}", "exit 0", "exit 2"
    ]


def test_a_daemon_of_other_code_is_not_used(tmp_path: Path) -> None:
    """A daemon started from another copy of lbuild refuses; the command runs here."""
    copy = tmp_path / "copy"
    for pkg in ("builder", "cache"):
        shutil.copytree(ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "run").mkdir(mode=0o700)
    d = start_daemon(tmp_path / "run" / "s", tmp_path / "log", pythonpath=copy)
    try:
        work = tmp_path / "work"
        write_files(work / "ctx", CTX)
        p = cli("build", "ctx", "--home", "home", "-q", sock=d.sock, cwd=work)
        assert p.returncode == 0, p.stderr
        assert d.ran() == []
        assert "lbuild daemon: refused a client of other code" in d.lines()
    finally:
        stop(d)


def test_no_daemon_listening_runs_in_process(tmp_path: Path) -> None:
    work = tmp_path / "work"
    write_files(work / "ctx", CTX)
    p = cli("build", "ctx", "--home", "home", "-q", sock=tmp_path / "nothing.sock", cwd=work)
    assert p.returncode == 0 and p.stdout.startswith("sha256:"), p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused(tmp_path: Path) -> None:
    """Even with the socket open to everyone (a mistake the daemon does not make itself),
    a client of another uid is refused (SO_PEERCRED)."""
    import tempfile

    run_dir = Path(tempfile.mkdtemp(prefix="lbuild-daemon-test-"))  # outside the 0700 tmp_path
    try:
        os.chmod(run_dir, 0o755)
        daemon = start_daemon(run_dir / "s", tmp_path / "log")
        try:
            os.chmod(daemon.sock, 0o666)
            _connect_as_nobody(daemon)
        finally:
            stop(daemon)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _connect_as_nobody(daemon: Daemon) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.sock))
            s.settimeout(30)
            # the daemon answers before it reads a request (sending one could meet a
            # connection it has already closed)
            os.write(w, s.recv(100))
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"refused another user\n"
    assert "lbuild daemon: refused a client of uid 65534" in daemon.lines()
    assert daemon.ran() == []


def test_an_unsafe_socket_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    p = subprocess.run(
        [sys.executable, "-m", "builder", "daemon", "--socket", str(shared / "s")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"lbuild: error: daemon socket directory {shared} must be a directory of this user "
        "that no one else can write to"
    ]
    assert not (shared / "s").exists()


def test_one_daemon_per_socket_and_sigterm_removes_it(daemon: Daemon, tmp_path: Path) -> None:
    again = subprocess.run(
        [sys.executable, "-m", "builder", "daemon", "--socket", str(daemon.sock)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert again.returncode == 2
    assert f"an lbuild daemon already listens on {daemon.sock}" in again.stderr
    assert daemon.sock.exists()
    stop(daemon)
    assert daemon.proc.returncode == 0
    assert not daemon.sock.exists()


def _wait_for(what: str, test: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not test():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="RUN needs root here")
def test_ctrl_c_and_a_killed_client_interrupt_the_command(
    daemon: Daemon, tmp_path: Path, busybox_home: Path
) -> None:
    """SIGINT to the client reaches the command (it stops as Ctrl-C stops it in-process:
    exit 130, "interrupted"); a client killed outright leaves its command interrupted by
    the daemon, not running on."""
    home = tmp_path / "home"
    shutil.copytree(busybox_home, home)
    work = tmp_path / "work"
    for n, how in enumerate(("sigint", "sigkill")):
        nap = f"sleep {4100 + n}"
        write_files(work / f"ctx{n}", {"Dockerfile": f"FROM busybox:test\nRUN {nap}\n"})
        e = dict(os.environ, PYTHONPATH=str(ROOT), LBUILD_DAEMON_SOCKET=str(daemon.sock))
        client = subprocess.Popen(
            [sys.executable, "-m", "builder", "build", f"ctx{n}", "--home", str(home),
             "--progress", "plain"],
            cwd=work, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for("the RUN to start", lambda nap=nap: _procs(nap))
        if how == "sigint":
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=60)
            assert client.returncode == 130, err
            assert err.strip().splitlines()[-1] == "lbuild: interrupted"
        else:
            client.kill()
            client.wait(timeout=60)
        _wait_for("the command to end", lambda nap=nap: not _procs(nap))
        pid = int(daemon.ran()[n].split()[3].rstrip(":"))
        _wait_for(
            "the daemon to reap its command",
            lambda pid=pid: f"lbuild daemon: pid {pid}: exit 130" in daemon.lines(),
        )
    assert any("its client went away: interrupted" in ln for ln in daemon.lines())


def _procs(marker: str) -> list[int]:
    return [pid for pid, _ in run_fixtures.procs_marked(marker)]



@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_client_sends_nothing_to_another_users_socket(tmp_path: Path) -> None:
    """A socket of another user where the client looks for its daemon (say, made in /tmp
    before the user's own daemon ran) gets neither the environment nor the streams: the
    client checks the listener's uid first, and runs the command itself."""
    import tempfile
    import threading

    run_dir = Path(tempfile.mkdtemp(prefix="lbuild-daemon-test-"))
    try:
        os.chmod(run_dir, 0o755)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(run_dir / "s"))
        os.chmod(run_dir / "s", 0o666)
        listener.listen(1)
        got: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(30)
            with conn:
                got.append(conn.recv(1 << 16))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        from builder.daemon import delegate

        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: a client of another user)
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                os.environ["LBUILD_DAEMON_SOCKET"] = str(run_dir / "s")
                os.environ["SECRET_TOKEN"] = "not-for-root"
                os.write(w, repr(delegate(["build", "."])).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            answer = f.read()
        t.join(30)
        assert answer == b"None"  # run it here
        assert got == [b""]  # connected, then closed without a byte
        listener.close()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_the_client_imports_only_built_in_modules(daemon: Daemon, tmp_path: Path) -> None:
    """A command handed to the daemon does nothing else in its own process: the client
    loads no json, socket, signal or contextlib (each an import of several modules that
    cost an interpreter without site hooks ~10 ms), and gets the command's exit status."""
    probe = (
        "import sys\n"
        "from builder.daemon_client import delegate\n"
        "code = delegate(['--version'])\n"
        "heavy = ('json', 'socket', 'signal', 'contextlib', 'enum', 'selectors', 'typing')\n"
        "print('loaded', [m for m in heavy if m in sys.modules], 'exit', code)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), LBUILD_DAEMON_SOCKET=str(daemon.sock))
    p = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "loaded [] exit 0" in p.stdout, p.stdout + p.stderr
    assert "lbuild" in p.stdout  # the version, printed by the daemon's child on our stdout
    assert len(daemon.ran()) == 1
