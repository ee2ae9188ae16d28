"""Tests for builder/executor.py: real busybox commands in the isolated RUN sandbox."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busybox import SHELL_PATH, make_busybox_rootfs, shell_spec

from builder.solve.executor import BindSpec, run
from cache.errors import InvalidInput, LbuildError
from cache.snapshots.snapshot import CopySnapshotter, OverlaySnapshotter, copy_tree

ROOT = Path(__file__).resolve().parent.parent
PATH = SHELL_PATH
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox tests run as root")


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return make_busybox_rootfs(tmp_path / "rootfs")


spec = shell_spec


def sh(rootfs: Path | list[object], script: str, **kw: object) -> tuple[int, str]:
    out: list[bytes] = []
    rc = run(spec(script, **kw), rootfs, on_output=out.append)  # type: ignore[arg-type]
    return rc, b"".join(out).decode()


def mountinfo() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [" ".join(line.split()[3:5]) for line in f]


def procs_with(marker: str) -> list[int]:
    """Processes whose whole command line is ``marker`` (or contains it, for a long marker)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmd.strip() == marker or (len(marker) > 20 and marker in cmd):
            found.append(int(pid))
    return found


def descendants(pid: int) -> set[int]:
    """All live processes below ``pid`` (through the parent links in /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat_line = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def wait_until(cond: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_gone(marker: str, timeout: float = 5) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := procs_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def no_leaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After the test: no mount of ours in the host namespace, no run directory left."""
    private_tmp = tmp_path / "runtmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    yield
    # Other tests (and tools) mount things meanwhile: look only for what a run could leave.
    assert [m for m in mountinfo() if "lbuild-run-" in m or str(tmp_path) in m] == []
    assert os.listdir(private_tmp) == []


def test_command_writes_files_and_exit_codes(rootfs: Path, no_leaks: None) -> None:
    rc, out = sh(
        rootfs, "echo hello; mkdir -p /app/data; echo content > /app/data/f; echo oops >&2"
    )
    assert rc == 0
    assert out == "hello\noops\n"
    assert (rootfs / "app/data/f").read_text() == "content\n"
    assert sh(rootfs, "exit 7")[0] == 7
    # The command is PID 1 (as under Docker): a signal it sends itself is ignored, while a
    # process it starts that is killed by one gives the shell 128+N.
    assert sh(rootfs, "kill -TERM $$; echo alive") == (0, "alive\n")
    assert sh(rootfs, "sh -c 'kill -TERM $$'; exit $?")[0] == 128 + signal.SIGTERM


def test_env_cwd_and_user(rootfs: Path, no_leaks: None) -> None:
    rc, out = sh(
        rootfs,
        'id -u; id -g; id -G; pwd; echo "$FOO"; touch /tmp/mine',
        env=(*PATH, ("FOO", "bar baz")),
        cwd="/home/app/work",
        uid=1000,
        gid=1000,
        groups=(1000, 65534),
    )
    assert rc == 0, out
    assert out.splitlines() == ["1000", "1000", "1000 65534", "/home/app/work", "bar baz"]
    # The working directory is made (by root, as runc does); the file belongs to the user.
    assert (rootfs / "home/app/work").is_dir()
    st = os.lstat(rootfs / "tmp/mine")
    assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_proc_dev_tmp_and_hostname(rootfs: Path, no_leaks: None) -> None:
    shutil.rmtree(rootfs / "tmp")
    script = textwrap.dedent(
        """
        echo pid=$$
        test -r /proc/1/cmdline && echo proc-ok
        echo x > /dev/null && head -c 4 /dev/zero | wc -c
        test -c /dev/urandom && echo urandom-ok
        echo shm > /dev/shm/f && cat /dev/shm/f
        test -d /tmp && echo tmp-ok
        hostname
        cat /etc/hostname
        grep -c localhost /etc/hosts
        """
    )
    rc, out = sh(rootfs, script, hostname="builder-host")
    assert rc == 0, out
    assert out.split() == [
        "pid=1",  # the shell is PID 1 of its own PID namespace (as under runc and Docker)
        "proc-ok",
        "4",
        "urandom-ok",
        "shm",
        "tmp-ok",
        "builder-host",
        "builder-host",
        "2",
    ]
    # Mount points the image lacked were removed again.
    assert sorted(os.listdir(rootfs)) == ["bin", "etc", "root"]
    assert sorted(os.listdir(rootfs / "etc")) == ["group", "passwd"]


def test_tmp_content_lands_in_the_rootfs(rootfs: Path, no_leaks: None) -> None:
    assert sh(rootfs, "echo kept > /tmp/f")[0] == 0
    assert (rootfs / "tmp/f").read_text() == "kept\n"


def test_network_none_has_only_loopback(rootfs: Path, no_leaks: None) -> None:
    rc, out = sh(rootfs, "ip -o link | cut -d: -f2; ip -o -4 addr | wc -l", network="none")
    assert rc == 0, out
    assert out.split() == ["lo", "1"]


def test_stdin_data(rootfs: Path, no_leaks: None) -> None:
    data = b"line one\n" + b"x" * 200_000 + b"\n"
    rc, out = sh(rootfs, "cat | wc -c", stdin_data=data)
    assert (rc, out.strip()) == (0, str(len(data)))
    assert sh(rootfs, "head -c 1 >/dev/null", stdin_data=data)[0] == 0  # stops reading early


def test_exec_failures(rootfs: Path, no_leaks: None) -> None:
    out: list[bytes] = []
    rc = run(spec("", argv=("/no/such/binary",)), rootfs, on_output=out.append)
    assert rc == 127
    assert b"/no/such/binary" in b"".join(out)
    (rootfs / "notexec").write_text("x")
    assert run(spec("", argv=("/notexec",)), rootfs, on_output=out.append) == 126


def test_extra_mounts(rootfs: Path, tmp_path: Path, no_leaks: None) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "input").write_text("from host")
    binds = (BindSpec(str(src), "/mnt/src", "bind", True), BindSpec(None, "/cache", "tmpfs"))
    rc, out = sh(
        rootfs,
        "cat /mnt/src/input; echo; echo x > /mnt/src/new || echo ro; echo c > /cache/c && cat /cache/c",
        extra_mounts=binds,
    )
    assert rc == 0, out
    assert out.splitlines()[0] == "from host"
    assert "ro" in out.splitlines()
    assert out.splitlines()[-1] == "c"
    assert not (src / "new").exists()
    assert not (rootfs / "mnt").exists()
    assert not (rootfs / "cache").exists()


def test_bad_specs(rootfs: Path) -> None:
    with pytest.raises(InvalidInput):
        run(spec("true", cwd="relative"), rootfs, on_output=lambda b: None)
    with pytest.raises(InvalidInput):
        run(spec("", argv=()), rootfs, on_output=lambda b: None)
    with pytest.raises(InvalidInput):
        run(
            spec("true", extra_mounts=(BindSpec(None, "/x", "bind"),)),
            rootfs,
            on_output=lambda b: None,
        )


def test_sandbox_setup_failure_is_an_error(rootfs: Path, no_leaks: None) -> None:
    (rootfs / "proc").write_text("not a directory")
    with pytest.raises(LbuildError, match="/proc"):
        sh(rootfs, "true")


def test_nothing_left_after_runs(rootfs: Path, no_leaks: None) -> None:
    rc, _ = sh(rootfs, "sleep 4241 & sleep 4241 & echo started")
    assert rc == 0
    assert wait_gone("sleep 4241", timeout=0.5) == []
    rc, _ = sh(rootfs, "(sleep 4240 &) ; exit 3")
    assert rc == 3
    assert wait_gone("sleep 4240", timeout=0.5) == []


BUILDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from builder.solve.executor import RunSpec, run

    def show(b):
        sys.stdout.buffer.write(b)
        sys.stdout.flush()

    spec = RunSpec(argv=("/bin/sh", "-c", "sleep {marker} & echo started; sleep {marker}"),
                   env=(("PATH", "/bin"),), cwd="/", uid=0, gid=0, groups=())
    run(spec, Path({rootfs!r}), on_output=show)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_builder_interrupted_mid_run(rootfs: Path, no_leaks: None, sig: signal.Signals) -> None:
    marker = str(4200 + int(sig))
    code = BUILDER.format(root=str(ROOT), rootfs=str(rootfs), marker=marker)
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"started\n"
        assert wait_until(lambda: len(procs_with(f"sleep {marker}")) == 2)
        below = descendants(p.pid)
        # Mid-run, the sandbox's mounts live only in its own mount namespace.
        assert [m for m in mountinfo() if "lbuild-run-" in m or str(rootfs) in m] == []
        assert len(below) >= 4  # helper, init, two sleeps (the shell execs the last one)
        p.send_signal(sig)
        _, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
    assert p.returncode != 0
    if sig == signal.SIGINT:
        assert b"KeyboardInterrupt" in err
    assert wait_until(lambda: not alive(below)), alive(below)
    assert procs_with(f"sleep {marker}") == []


@pytest.mark.parametrize("kind", ["overlay", "copy"])
def test_run_on_a_snapshot_diff_has_only_the_commands_changes(
    tmp_path: Path, kind: str, no_leaks: None
) -> None:
    snap = (
        OverlaySnapshotter(tmp_path / "s") if kind == "overlay" else CopySnapshotter(tmp_path / "s")
    )
    base = make_busybox_rootfs(tmp_path / "base")
    shutil.rmtree(base / "tmp")
    snap.prepare("k0", None)
    target, _overlay = snap.apply_target("k0")
    shutil.rmtree(target)
    copy_tree(base, target)
    snap.commit("base", "k0")
    mounts = snap.prepare("k1", "base")
    out: list[bytes] = []
    rc = run(
        spec(
            "cat /etc/hosts >/dev/null && echo made > /etc/made && rm /bin/vi && ls /proc/self >/dev/null"
        ),
        mounts,
        on_output=out.append,
    )
    assert rc == 0, out
    assert [(e.path, e.type) for e in snap.diff("k1")] == [
        ("bin", "dir"),
        ("bin/vi", "whiteout"),
        ("etc", "dir"),
        ("etc/made", "file"),
    ]
    snap.close()


def test_rootless_single_mapping(tmp_path: Path) -> None:
    # The test's own interpreter may live under /root (0700): use the system one.
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the unprivileged user")
    area = Path(tempfile.mkdtemp(prefix="lbuild-rootless-"))
    try:
        os.chmod(area, 0o755)
        rootfs = make_busybox_rootfs(area / "rootfs")
        subprocess.run(["chown", "-R", "-h", "65534:65534", str(rootfs)], check=True)
        code = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from builder.solve.executor import RunSpec, run
            from cache.errors import LbuildError
            out = []
            # network "none": the default network needs /dev/net/tun, root-only on many hosts
            s = RunSpec(argv=("/bin/sh", "-c", "id -u; echo x > /made"), env=(("PATH", "/bin"),),
                        cwd="/", uid=0, gid=0, groups=(), network="none")
            rc = run(s, Path({str(rootfs)!r}), on_output=out.append)
            print(rc, b"".join(out).decode().strip())
            try:
                run(RunSpec(argv=("true",), env=(), cwd="/", uid=1000, gid=1000, groups=()),
                    Path({str(rootfs)!r}), on_output=out.append)
            except LbuildError as e:
                print("refused:", e)
            """
        )
        p = subprocess.run(
            [
                "setpriv",
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                python,
                "-c",
                code,
            ],
            capture_output=True,
            text=True,
            cwd="/",
            env={"PATH": os.environ["PATH"], "HOME": str(area)},
            timeout=60,
        )
        if "cannot map ids" in p.stderr or "unshare" in p.stderr:
            pytest.skip(f"no unprivileged user namespaces here: {p.stderr.strip()[-200:]}")
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == "0 0"
        assert lines[1].startswith("refused:") and "subuid" in lines[1]
        assert os.lstat(rootfs / "made").st_uid == 65534
    finally:
        shutil.rmtree(area)
