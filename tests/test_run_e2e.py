"""RUN end to end through the real CLI: heredocs, ENV and build args, networks, cache mounts,
secrets, the RUN cache, a failing command, runc running the image, and nothing (no mount, no
process, no active snapshot) left behind by a build, a failed build or a SIGINT mid-RUN."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import (
    Built,
    build,
    mount_lines,
    needs_root,
    plain,
    procs_marked,
    walk_files,
)
from util import ROOT, lbuild, tool, umoci_unpack

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome
pytestmark = [needs_root, pytest.mark.slow]

FEATURES = """\
FROM busybox:test
ARG BA=default-arg
ENV EV=env-value
RUN <<EOF
echo "$EV $BA" > /env-seen
echo visible-output
EOF
RUN cat <<A > /a && cat <<-B > /b
alpha
A
\tbeta
\tB
RUN <<-EOT
\techo tabbed > /tabbed
\tEOT
RUN <<EOT
#!/bin/sh -e
echo "shebang $EV $0" > /shebang
EOT
RUN cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort > /net-default
RUN --network=none cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort > /net-none
RUN --mount=type=secret,id=tok md5sum < /run/secrets/tok > /secret-md5
RUN --mount=type=secret,id=tok,target=/opt/tok md5sum < /opt/tok > /secret-md5-2
"""


@dataclass(frozen=True)
class Features:
    """FEATURES built twice in one home: fresh, then again (all cached)."""

    home: Path
    secret: bytes
    first: Built
    again: Built
    rootfs: Path  # the first build, unpacked by umoci

    def output(self) -> str:
        return "".join(b.proc.stdout + b.proc.stderr for b in (self.first, self.again))


@pytest.fixture(scope="module")
def features(busybox_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Features:
    root = tmp_path_factory.mktemp("features")
    secret = f"s3cret-{uuid.uuid4().hex}".encode()
    (root / "tok").write_bytes(secret)
    args = ("--build-arg", "BA=from-cli", "--secret", f"id=tok,src={root / 'tok'}")
    ctx = root / "ctx"
    first = build(ctx, busybox_home, FEATURES, *args)
    again = build(ctx, busybox_home, FEATURES, *args)
    rootfs = umoci_unpack(first.layout, root / "bundle")
    return Features(busybox_home, secret, first, again, rootfs)


def read(rootfs: Path, rel: str) -> str:
    return (rootfs / rel).read_text()


def test_heredocs(features: Features) -> None:
    r = features.rootfs
    assert read(r, "a") == "alpha\n"
    assert read(r, "b") == "beta\n"  # <<- strips leading tabs
    assert read(r, "tabbed") == "tabbed\n"
    # A #! heredoc runs through its interpreter, with the stage's environment.
    assert read(r, "shebang").startswith("shebang env-value ")


def test_env_and_build_args_reach_run_but_args_are_not_persisted(features: Features) -> None:
    assert read(features.rootfs, "env-seen") == "env-value from-cli\n"
    cfg = features.first.config()
    assert "EV=env-value" in cfg["config"]["Env"]
    assert not any(e.startswith("BA=") for e in cfg["config"]["Env"])
    assert "from-cli" not in json.dumps(cfg)


def test_run_output_streams_under_the_step_name(features: Features) -> None:
    lines = features.first.proc.stderr.splitlines()
    assert any(
        line.startswith("[stage-0 3/") and line.endswith("] | visible-output") for line in lines
    ), lines


def test_network_none_has_only_loopback(features: Features) -> None:
    assert read(features.rootfs, "net-none").split() == ["lo"]
    # The default is a network namespace of its own, served by slirp4netns (issue 11 item 1;
    # the host's needs --allow network.host: tests/test_isolation_e2e.py).
    assert read(features.rootfs, "net-default").split() == ["lo", "tap0"]


def read_layer_file(b: Built, rel: str) -> str:
    for layer in reversed(b.layers()):
        for m in layer.members:
            if m.name == rel:
                return m.data.decode()
    raise AssertionError(f"{rel} in no layer")


def test_secret_readable_during_run(features: Features) -> None:
    want = hashlib.md5(features.secret).hexdigest()
    assert read(features.rootfs, "secret-md5").split()[0] == want
    assert read(features.rootfs, "secret-md5-2").split()[0] == want
    for gone in ("run", "opt", "run/secrets/tok", "opt/tok"):
        assert not (features.rootfs / gone).exists(), gone


def test_secret_in_no_layer_blob_record_or_output(features: Features) -> None:
    s = features.secret
    assert s not in features.output().encode()
    blobs = list(walk_files(features.home / "blobs"))
    assert len(blobs) > 10
    for p in blobs:
        assert s not in plain(p.read_bytes()), p
    for b in (features.first, features.again):
        for p in walk_files(b.layout):
            assert s not in plain(p.read_bytes()), p
    for db in features.home.glob("lbuild.db*"):  # step keys and their stored inputs
        assert s not in db.read_bytes()
    assert s.hex().encode() not in b"".join(
        db.read_bytes() for db in features.home.glob("lbuild.db*")
    )


def test_second_build_is_all_cached(features: Features) -> None:
    steps = [x for x in features.again.proc.stderr.splitlines() if x.startswith("[stage-0 ")]
    assert len(steps) == 10 and all(x.endswith(" CACHED") for x in steps), steps
    assert "10/10 steps cached" in features.again.proc.stderr
    assert features.again.config() == features.first.config()


def cached_steps(proc: subprocess.CompletedProcess[str]) -> dict[str, bool]:
    out = {}
    for line in proc.stdout.splitlines():
        ev = json.loads(line)
        if ev["event"] == "step_done":
            out[ev["name"].split("] ", 1)[1]] = ev["cached"]
    return out


def test_run_cache_misses_on_change_and_cache_mounts_persist(bbhome: Path, tmp_path: Path) -> None:
    counted = "RUN --mount=type=cache,target=/c sh -c 'echo x>>/c/x; wc -l</c/x>/n'"

    def go(df: str) -> tuple[dict[str, bool], Built]:
        b = build(tmp_path / "ctx", bbhome, df, "--progress", "json")
        return cached_steps(b.proc), b

    def count(b: Built) -> int:
        return int(read_layer_file(b, "n"))

    base = f"FROM busybox:test\nENV A=1\nRUN echo one > /one\n{counted}\n"
    steps, b = go(base)
    assert steps == {"ENV A=1": False, "RUN echo one > /one": False, counted: False}
    assert count(b) == 1
    steps, b = go(base)
    assert set(steps.values()) == {True}  # all cached: the counted step did not run
    assert count(b) == 1
    changed = base.replace("echo one", "echo ONE")
    steps, b = go(changed)
    assert steps == {"ENV A=1": True, "RUN echo ONE > /one": False, counted: False}
    assert count(b) == 2  # the cache mount kept what the first run wrote
    env_changed = changed.replace("ENV A=1", "ENV A=2")
    steps, b = go(env_changed)
    assert steps == {"ENV A=2": False, "RUN echo ONE > /one": False, counted: False}
    assert count(b) == 3
    for layer in b.layers():
        assert not any(n == "c" or n.startswith("c/") for n in layer.names())
    assert list((bbhome / "cache-mounts").iterdir())  # it lives in the home, not in the image


def plan_status(ctx: Path, home: Path) -> dict[str, str]:
    """``lbuild plan``: HIT or MISS per step, building nothing."""
    doc = json.loads(lbuild("plan", ctx, "--format", "json", home=home).stdout)
    return {s["name"].split("] ", 1)[1]: s["status"] for s in doc["steps"] if s["kind"] != "base"}


def leftovers(home: Path) -> dict[str, object]:
    """What a build may have left: mounts under the home, marked processes, active snapshots."""
    active = [p for d in (home / "snapshots").glob("*/active") for p in d.iterdir()]
    tmp = list((home / "tmp").iterdir()) if (home / "tmp").is_dir() else []
    return {
        "mounts": mount_lines(str(home)),
        "procs": procs_marked(str(home)),
        "active": active,
        "tmp": tmp,
    }


NOTHING: dict[str, object] = {"mounts": [], "procs": [], "active": [], "tmp": []}


def test_failing_command(bbhome: Path, tmp_path: Path) -> None:
    df = "FROM busybox:test\nRUN echo ok > /ok\nRUN echo to-stderr >&2; exit 3\nRUN echo never\n"
    b = build(tmp_path / "ctx", bbhome, df, check=False)
    assert b.proc.returncode == 1
    err = b.proc.stderr
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lbuild: error: ")
    assert f"{tmp_path / 'ctx' / 'Dockerfile'}:3:" in last
    assert "RUN echo to-stderr >&2; exit 3" in last and "exit code 3" in last
    # The step is named in the progress output next to the error, and the output came through.
    assert "[stage-0 2/3] | to-stderr" in err.splitlines()
    assert "[stage-0 2/3] RUN echo to-stderr >&2; exit 3 FAILED" in err.splitlines()
    assert sum("exit code 3" in line for line in err.splitlines()) == 1  # said once
    assert "| never" not in err
    assert not b.layout.exists()  # nothing exported
    assert leftovers(bbhome) == NOTHING
    # The step before the failure was recorded, the failed one was not.
    assert plan_status(tmp_path / "ctx", bbhome) == {
        "RUN echo ok > /ok": "HIT",
        "RUN echo to-stderr >&2; exit 3": "MISS",
        "RUN echo never": "MISS",
    }


def test_relative_home_context_and_secret_paths_serve_a_run(bbhome: Path, tmp_path: Path) -> None:
    """``--home`` / ``LBUILD_HOME``, the context and ``--secret src=`` relative to the working
    directory: the RUN's sandbox helper works from ``/``, so each is made absolute first (the
    overlay mount of the layer directories, the context's bind mount and the secret's were
    "No such file or directory" before)."""
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "data.txt").write_text("from-the-context\n")
    (tmp_path / "sec.txt").write_text("the-secret\n")
    (tmp_path / "ctx" / "Dockerfile").write_text(
        "FROM busybox:test\n"
        "RUN --mount=type=bind,source=data.txt,target=/d cat /d > /ran\n"
        "RUN --mount=type=secret,id=s cat /run/secrets/s >> /ran\n"
    )
    rel = os.path.relpath(bbhome, tmp_path)
    assert not os.path.isabs(rel)
    for n, how in enumerate((["--home", rel], [])):
        out = tmp_path / f"oci-{n}"
        p = lbuild(
            "build", "ctx", *how, "--no-cache", "--progress", "plain", "--secret", "id=s,src=sec.txt",
            "--output", f"type=oci,dest={out}",
            home=Path(rel), cwd=tmp_path, check=False, env={"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        rootfs = umoci_unpack(out, tmp_path / f"bundle-{n}")
        assert (rootfs / "ran").read_text() == "from-the-context\nthe-secret\n"
    assert leftovers(bbhome) == NOTHING


def test_nothing_left_after_a_build(bbhome: Path, tmp_path: Path) -> None:
    before = mount_lines(str(tmp_path))
    nap = f"sleep {random.randint(4000, 4999)}"
    df = (
        "FROM busybox:test\nRUN --mount=type=tmpfs,target=/scratch sh -c "
        f"'{nap} & echo bg > /scratch/x; cat /scratch/x > /bg'\n"
    )
    build(tmp_path / "ctx", bbhome, df, "--snapshotter", "overlay")
    build(tmp_path / "ctx", bbhome, df, "--snapshotter", "copy", "--no-cache")
    assert mount_lines(str(tmp_path)) == before == []
    assert leftovers(bbhome) == NOTHING
    # What the command started in the background died with the step.
    assert procs_marked(nap) == []


def test_sigint_mid_run_leaves_nothing(bbhome: Path, tmp_path: Path) -> None:
    nap = f"sleep {random.randint(3000, 3999)}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM busybox:test\nRUN echo started; {nap}\n")
    proc = start_build(ctx, bbhome, "--progress", "plain")
    try:
        wait_for(nap, proc)
        assert procs_marked(str(bbhome))  # the builder and its sandbox helpers
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - t0 < 10, "the builder waited for the command"
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "lbuild: interrupted"
    time.sleep(0.2)  # the killed sandbox's processes are reaped by now
    assert procs_marked(nap) == []
    assert leftovers(bbhome) == NOTHING
    assert plan_status(ctx, bbhome) == {f"RUN echo started; {nap}": "MISS"}  # not recorded


def test_image_runs_in_runc(bbhome: Path, tmp_path: Path) -> None:
    df = """\
FROM busybox:test
ENV GREETING=hello
RUN <<EOF
printf '#!/bin/sh\\necho "$GREETING from $(cat /etc/motd) as $(id -u):$(id -g) in $(pwd)"\\n' > /hello
chmod 755 /hello
echo lbuild > /etc/motd
mkdir -p /work && chown app:app /work
EOF
USER app
WORKDIR /work
CMD ["/hello"]
"""
    b = build(tmp_path / "ctx", bbhome, df)
    bundle = tmp_path / "bundle"
    umoci_unpack(b.layout, bundle)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    assert spec["process"]["args"] == ["/hello"]
    (bundle / "config.json").write_text(json.dumps(spec))
    cid = f"lbuild-test-{uuid.uuid4().hex[:12]}"
    try:
        p = tool("runc", "run", "-b", bundle, cid)
    finally:
        tool("runc", "delete", "-f", cid, check=False)
    assert p.stdout == "hello from lbuild as 1000:1000 in /work\n"


def test_bind_mount_content_is_in_the_run_key(bbhome: Path, tmp_path: Path) -> None:
    df = "FROM busybox:test\nRUN --mount=type=bind,source=src,target=/mnt cat /mnt/in > /out\n"
    ctx = tmp_path / "ctx"
    first = build(ctx, bbhome, df, files={"src/in": "v1\n"})
    assert read_layer_file(first, "out") == "v1\n"
    # Read-only by default: the context is not changed through the mount.
    assert sorted(p.name for p in (ctx / "src").iterdir()) == ["in"]
    second = build(ctx, bbhome, df, files={"src/in": "v2\n"})
    assert read_layer_file(second, "out") == "v2\n"


def start_build(ctx: Path, home: Path, *args: str) -> subprocess.Popen[str]:
    """``lbuild build`` in the background.  A shell's background job starts with SIGINT
    ignored (and the test runner may be one): give the builder the default, as a terminal would."""
    env = dict(os.environ, LBUILD_HOME=str(home))
    env.pop("SOURCE_DATE_EPOCH", None)
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", str(ctx), "--home", str(home), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(marker: str, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not procs_marked(marker):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{marker} never started"
        time.sleep(0.05)


def test_sigkilled_builder_leaves_no_process_and_the_next_build_collects_its_snapshot(
    bbhome: Path, tmp_path: Path
) -> None:
    nap = f"sleep {random.randint(5000, 5999)}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM busybox:test\nRUN {nap}\n")
    proc = start_build(ctx, bbhome, "--snapshotter", "copy")
    try:
        wait_for(nap, proc)
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + 10
    while procs_marked(nap) or procs_marked(str(bbhome)):  # the sandbox dies with its parent
        assert time.monotonic() < deadline, procs_marked(nap) + procs_marked(str(bbhome))
        time.sleep(0.05)
    stale = list((bbhome / "snapshots" / "copy" / "active").iterdir())
    assert len(stale) == 1 and (stale[0] / "fs" / "bin" / "busybox").is_file()
    assert mount_lines(str(bbhome)) == []
    (ctx / "Dockerfile").write_text("FROM busybox:test\nRUN echo next > /next\n")
    b = build(ctx, bbhome, (ctx / "Dockerfile").read_text(), "--snapshotter", "copy")
    assert read_layer_file(b, "next") == "next\n"
    assert list((bbhome / "snapshots" / "copy" / "active").iterdir()) == []
