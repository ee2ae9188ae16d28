"""RUN isolation through the real CLI (issue 11 items 1 and 6): ``--network=host`` needs the
``network.host`` entitlement, and SIGTERM is handled as SIGINT is (cleanup, exit 143), on
both RUN paths."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import build, mount_lines, needs_root, procs_marked
from util import ROOT

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome
pytestmark = [needs_root, pytest.mark.slow]

RUNTIMES = [
    pytest.param(
        "runc",
        marks=pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    ),
    "builtin",
]


def test_network_host_needs_the_entitlement(bbhome: Path, tmp_path: Path) -> None:
    df = "FROM busybox:test\nRUN --network=host readlink /proc/self/ns/net > /netns\n"
    denied = build(tmp_path / "ctx", bbhome, df, check=False)
    assert denied.proc.returncode == 2, denied.proc.stderr
    last = denied.proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lbuild: error: ")
    assert "Dockerfile:2:" in last and "network.host" in last and "--allow" in last
    allowed = build(tmp_path / "ctx", bbhome, df, "--allow", "network.host")
    netns = [m.data for layer in allowed.layers() for m in layer.members if m.name == "netns"]
    assert netns == [os.readlink("/proc/self/ns/net").encode() + b"\n"]


def test_security_insecure_is_not_supported(bbhome: Path, tmp_path: Path) -> None:
    # It would mean every capability and no seccomp: refused (exit 2), never run sandboxed
    # as if the flag were not there.
    df = "FROM busybox:test\nRUN --security=insecure true\n"
    b = build(tmp_path / "ctx", bbhome, df, "--allow", "network.host", check=False)
    assert b.proc.returncode == 2, b.proc.stderr
    last = b.proc.stderr.strip().splitlines()[-1]
    assert "Dockerfile:2:" in last and "--security=insecure is not supported yet" in last



@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_sees_dev_mqueue_and_a_read_only_sys_fs_cgroup(
    bbhome: Path, tmp_path: Path, runtime: str
) -> None:
    script = (
        "grep -E ' /dev/mqueue | /sys/fs/cgroup(/[^ ]*)? ' /proc/self/mounts | cut -d' ' -f2-4 > /m; "
        "mkdir /sys/fs/cgroup/x 2>/dev/null && echo written >> /m; "
        "for d in /sys/fs/cgroup/*/; do mkdir ${d}x 2>/dev/null && echo written >> /m; done; true"
    )
    b = build(tmp_path / "ctx", bbhome, f"FROM busybox:test\nRUN {script}\n",
              env={"LBUILD_RUNTIME": runtime})
    got = [m.data for layer in b.layers() for m in layer.members if m.name == "m"]
    assert len(got) == 1
    lines = got[0].decode().splitlines()
    top = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("/")}  # last wins
    assert top["/dev/mqueue"][0] == "mqueue", lines
    assert {"nosuid", "nodev", "noexec"} <= set(top["/dev/mqueue"][1].split(",")), lines
    cg = {k: v for k, v in top.items() if k.startswith("/sys/fs/cgroup")}
    assert "/sys/fs/cgroup" in cg and all(v[1].startswith("ro,") for v in cg.values()), lines
    assert "written" not in lines


def start_build(ctx: Path, home: Path, runtime: str) -> subprocess.Popen[str]:
    env = dict(os.environ, LBUILD_HOME=str(home), LBUILD_RUNTIME=runtime)
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", str(ctx), "--home", str(home)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # what a service manager gives its child: SIGTERM with its default action
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )


def poll_until(cond: object, proc: subprocess.Popen[str] | None = None) -> None:
    """Poll ``cond`` (a callable) until true; a limit only so a broken build cannot hang."""
    for _ in range(1200):
        if cond():  # type: ignore[operator]
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    raise AssertionError("condition never became true")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigterm_mid_run_cleans_up_and_exits_143(
    bbhome: Path, tmp_path: Path, runtime: str
) -> None:
    nap = f"sleep {random.randint(6000, 6999)}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM busybox:test\nRUN echo started > /s; {nap}\n")
    proc = start_build(ctx, bbhome, runtime)
    try:
        poll_until(lambda: procs_marked(nap), proc)
        active = [p for d in (bbhome / "snapshots").glob("*/active") for p in d.iterdir()]
        assert active  # the RUN's snapshot, which SIGTERM used to leave behind
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "lbuild: terminated"
    poll_until(lambda: not procs_marked(nap))
    assert procs_marked(str(bbhome)) == []
    assert mount_lines(str(bbhome)) == []
    assert [p for d in (bbhome / "snapshots").glob("*/active") for p in d.iterdir()] == []
