"""RUN isolation (issue 11 items 1-3): what a RUN command can reach, on both RUN paths.

Every test runs on runc (the default as root where it is installed) and on the built-in
executor (the fallback): both must give Docker's capability set, its seccomp profile, its
masked and read-only paths, a network namespace of its own (outbound access through
slirp4netns by default, only ``lo`` with ``none``), and PID 1 from the image with no host
file reachable.  Each assertion failed before the fix (RUN had every capability, no
seccomp, the host's network, and lbuild's Python as PID 1).
"""

from __future__ import annotations

import http.server
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from busybox import SHELL_PATH, make_busybox_rootfs, shell_spec

from builder.solve import policy
from builder.solve.executor import BindSpec, run

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox tests run as root")

RUNTIMES = [
    pytest.param(
        "runc",
        marks=pytest.mark.skipif(shutil.which("runc") is None, reason="runc is not installed"),
    ),
    "builtin",
]
PATH = SHELL_PATH
DOCKER_CAPS = "00000000a80425fb"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the module: the tests below write nothing into it (checked at the end).
    return make_busybox_rootfs(tmp_path_factory.mktemp("iso") / "rootfs")


@pytest.fixture(scope="module", autouse=True)
def rootfs_unchanged(rootfs: Path) -> Iterator[None]:
    before = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    yield
    assert sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*")) == before


def sh(rootfs: Path, runtime: str, script: str, **kw: object) -> tuple[int, str]:
    out: list[bytes] = []
    rc = run(shell_spec(script, **kw), rootfs, on_output=out.append, runtime=runtime)
    return rc, b"".join(out).decode()


def status_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {text!r}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_capabilities_and_seccomp_are_dockers(rootfs: Path, runtime: str) -> None:
    rc, out = sh(rootfs, runtime, "cat /proc/self/status")
    assert rc == 0, out
    assert int(DOCKER_CAPS, 16) == policy.CAP_MASK
    assert status_field(out, "CapEff") == DOCKER_CAPS
    assert status_field(out, "CapPrm") == DOCKER_CAPS
    assert status_field(out, "CapBnd") == DOCKER_CAPS
    assert status_field(out, "CapAmb") == "0000000000000000"
    assert status_field(out, "Seccomp") == "2"
    assert status_field(out, "NoNewPrivs") == "0"  # setuid binaries work, as in Docker
    # Another user has no capability at all, and cannot get one back beyond the set.
    rc, out = sh(rootfs, runtime, "cat /proc/self/status", uid=1000, gid=1000)
    assert rc == 0, out
    assert status_field(out, "CapEff") == "0000000000000000"
    assert status_field(out, "CapBnd") == DOCKER_CAPS


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mounting_and_namespaces_are_denied(rootfs: Path, runtime: str) -> None:
    script = (
        "mkdir -p /tmp/m; mount -t tmpfs none /tmp/m && echo mounted; "
        "mount -t proc proc /tmp/m && echo proc-mounted; "
        "unshare -m true && echo unshared; "
        "grep -c /tmp/m /proc/self/mounts; rmdir /tmp/m"
    )
    rc, out = sh(rootfs, runtime, script)
    assert "mounted" not in out and "unshared" not in out, out
    assert out.splitlines()[-1] == "0"
    assert rc == 0, out


def host_addresses() -> str:
    return subprocess.run(
        ["ip", "-o", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("network", ["default", "host"])
def test_cannot_change_the_hosts_network(rootfs: Path, runtime: str, network: str) -> None:
    # With --network=host (entitled) the namespace is the host's: only the missing
    # CAP_NET_ADMIN stops the command, and that is what this checks.
    before = host_addresses()
    rc, out = sh(
        rootfs,
        runtime,
        "ip addr add 10.231.7.9/32 dev lo && echo added; ip link set lo down && echo down; true",
        network=network,
    )
    assert rc == 0, out
    assert "added" not in out and "down" not in out, out
    assert "10.231.7.9" not in host_addresses()
    assert host_addresses() == before


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("network", ["default", "none", "host"])
def test_network_namespace(rootfs: Path, runtime: str, network: str) -> None:
    rc, out = sh(rootfs, runtime, "readlink /proc/self/ns/net; ls /sys/class/net", network=network)
    assert rc == 0, out
    lines = out.split()
    host_ns = os.readlink("/proc/self/ns/net")
    if network == "host":
        assert lines[0] == host_ns
        return
    assert lines[0] != host_ns
    expected = {"default": ["lo", "tap0"], "none": ["lo"]}[network]
    assert sorted(lines[1:]) == expected


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("network", ["default", "none", "host"])
def test_a_helper_started_with_its_network_serves_only_the_default_network(
    rootfs: Path, runtime: str, network: str
) -> None:
    """A helper started ahead makes its network namespace, and slirp4netns serves it, before
    it knows its run: a RUN on the default network gets that namespace (tap0 up, the
    helper's slirp4netns); a RUN on another network gets a helper of its own, never the
    network made ahead."""
    from builder.solve.executor import Helper

    helper = Helper(stdin=False, network=True)
    pid = helper.proc.pid if helper.proc is not None else -1
    try:
        out: list[bytes] = []
        script = "readlink /proc/self/ns/net; ls /sys/class/net"
        rc = run(shell_spec(script, network=network), rootfs, on_output=out.append,
                 runtime=runtime, helper=helper)  # fmt: skip
    finally:
        helper.discard()
    text = b"".join(out).decode()
    assert rc == 0, text
    lines = text.split()
    if network == "host":
        assert lines[0] == os.readlink("/proc/self/ns/net")
        return
    assert lines[0] != os.readlink("/proc/self/ns/net")
    assert sorted(lines[1:]) == {"default": ["lo", "tap0"], "none": ["lo"]}[network]
    assert helper.proc is None  # taken by the run, or discarded when it did not fit
    # the helper's process is gone either way, and with it any slirp4netns it had (told
    # to exit, and reaped on a thread of its own)
    import time

    assert not os.path.exists(f"/proc/{pid}")
    deadline = time.monotonic() + 10
    while [p for p in os.listdir("/proc") if p.isdigit() and _slirp_of(p, pid)]:
        assert time.monotonic() < deadline, "slirp4netns outlived its helper"
        time.sleep(0.05)


def _slirp_of(proc_pid: str, helper_pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{proc_pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"slirp4netns") and str(helper_pid).encode() in cmd


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pid1_is_the_image_binary_and_no_host_file_is_mapped(rootfs: Path, runtime: str) -> None:
    script = (
        "echo pid=$$; readlink /proc/1/exe; "
        "for f in /proc/1/map_files/*; do readlink $f; done | sort -u; "
        "for p in /proc/[0-9]*; do readlink $p/exe; done | sort -u; "
        "cmp /proc/1/exe /bin/busybox && echo same-bytes"
    )
    rc, out = sh(rootfs, runtime, script)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == "pid=1"
    # Every executable and mapped file of every process is the image's busybox (static):
    # no Python, no host library, no runc binary.
    assert set(lines[1:-1]) == {"/bin/busybox"}, lines
    assert lines[-1] == "same-bytes"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_masked_and_read_only_paths(rootfs: Path, runtime: str) -> None:
    script = (
        "for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do "  # if present
        "  test -e $p || continue; echo $p $(head -c 64 $p 2>/dev/null | wc -c); done; "
        "for d in /sys/firmware /proc/acpi /proc/scsi; do "
        "  test -d $d || continue; echo $d $(ls -A $d | wc -l); done; "
        "(echo h > /proc/sysrq-trigger) 2>/dev/null && echo sysrq-written; "
        "(echo lbuild-x > /proc/sys/kernel/domainname) 2>/dev/null && echo sysctl-written; "
        "(echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null && echo caches-dropped; "
        "grep -E ' /proc/(sys|bus|fs|irq) ' /proc/self/mounts | cut -d' ' -f4 | cut -d, -f1 | sort -u; "
        "true"
    )
    rc, out = sh(rootfs, runtime, script)
    assert rc == 0, out
    lines = out.splitlines()
    counted = [ln.split() for ln in lines if ln.startswith(("/proc/", "/sys/"))]
    # /proc/keys and /sys/firmware exist on every kernel here (/proc/kcore may not)
    assert {p for p, _ in counted} >= {"/proc/keys", "/sys/firmware"}, lines
    assert all(n == "0" for _, n in counted), lines
    assert not any(ln.endswith(("-written", "-dropped")) for ln in lines), lines
    assert lines[-1] == "ro", lines
    with open("/proc/sys/kernel/domainname") as f:
        assert "lbuild-x" not in f.read()


class _Server:
    """A throwaway HTTP server on ``host`` serving one file."""

    def __init__(self, host: str, root: Path) -> None:
        handler = _quiet_handler(root)
        self.httpd = http.server.ThreadingHTTPServer((host, 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _quiet_handler(root: Path) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def global_ipv4() -> str | None:
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        words = line.split()
        if "inet" in words:
            return words[words.index("inet") + 1].split("/")[0]
    return None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    """(host address, port there, port on the host's 127.0.0.1), both serving ``hello``."""
    addr = global_ipv4()
    if addr is None:
        pytest.skip("this host has no global IPv4 address to serve from")
    (tmp_path / "hello").write_text("hello from the host\n")
    outside = _Server(addr, tmp_path)
    loop = _Server("127.0.0.1", tmp_path)
    try:
        yield addr, outside.port, loop.port
    finally:
        outside.close()
        loop.close()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_outbound_access_by_default_but_not_the_hosts_loopback(
    rootfs: Path, runtime: str, served: tuple[str, int, int]
) -> None:
    addr, port, loop_port = served
    # (busybox 1.35's wget crashes on a refused connection when given -T: use timeout(1))
    script = (
        f"wget -q -O - http://{addr}:{port}/hello; "
        f"(timeout 5 wget -q -O - http://10.0.2.2:{loop_port}/hello && echo reached-loopback)"
        " 2>/dev/null; grep -c nameserver /etc/resolv.conf"
    )
    rc, out = sh(rootfs, runtime, script)
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == "hello from the host"
    assert "reached-loopback" not in out and len(lines) == 2, out
    assert int(lines[-1]) >= 1
    # --network=none reaches nothing.
    rc, out = sh(
        rootfs, runtime, f"timeout 5 wget -q -O - http://{addr}:{port}/hello", network="none"
    )
    assert rc != 0 and "hello" not in out, out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_user_groups_env_cwd_hostname_and_mounts(
    rootfs: Path, runtime: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "in").write_text("bound\n")
    old_umask = os.umask(0o027)  # lbuild's own umask must not reach RUN
    try:
        rc, out = sh(
            rootfs,
            runtime,
            'umask; id -u; id -g; id -G; pwd; echo "$FOO"; hostname; cat /etc/hostname; cat /mnt/in; '
            "(echo x > /mnt/x) 2>/dev/null || echo ro; grep -c ' /scratch tmpfs ' /proc/self/mounts",
            env=(*PATH, ("FOO", "a b")),
            cwd="/tmp",
            uid=1000,
            gid=1000,
            groups=(1000, 65534),
            hostname="iso-host",
            extra_mounts=(
                BindSpec(str(src), "/mnt", "bind", True),
                BindSpec(None, "/scratch", "tmpfs"),
            ),
        )
    finally:
        os.umask(old_umask)
    assert rc == 0, out
    assert out.splitlines() == [
        "0022",  # runc's umask on both paths, whatever lbuild's own is
        "1000",
        "1000",
        "1000 65534",
        "/tmp",
        "a b",
        "iso-host",
        "iso-host",
        "bound",
        "ro",
        "1",
    ]
    assert sorted(p.name for p in src.iterdir()) == ["in"]


LOOP_CONTROL = (10, 237)
"""A device the host can open (harmless: opening allocates nothing) that Docker's devices
cgroup does not allow."""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_device_nodes_it_makes_cannot_be_opened(rootfs: Path, runtime: str, tmp_path: Path) -> None:
    # CAP_MKNOD is in Docker's set; what keeps a RUN from the host's devices is that only
    # the devices of /dev can be opened (runc: the devices cgroup; built-in: nodev mounts).
    probe = tmp_path / "probe"
    os.mknod(probe, 0o600 | stat.S_IFCHR, os.makedev(*LOOP_CONTROL))
    try:
        os.close(os.open(probe, os.O_RDONLY))
    except OSError as exc:
        pytest.skip(f"this host cannot open /dev/loop-control itself: {exc}")
    finally:
        probe.unlink()
    cache = tmp_path / "cache"
    cache.mkdir()
    major, minor = LOOP_CONTROL
    script = "".join(
        f"mknod {d}/lc c {major} {minor}; (exec 3<{d}/lc) 2>/dev/null && echo opened {d}; "
        f"rm {d}/lc; "
        for d in ("/tmp", "/dev", "/cache")
    )
    rc, out = sh(
        rootfs,
        runtime,
        script + "head -c 4 /dev/zero | wc -c",
        extra_mounts=(BindSpec(str(cache), "/cache", "bind"),),
    )
    assert rc == 0, out
    assert out.split() == ["4"], out  # nothing opened; /dev's own devices work


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_only_stdio_is_open(rootfs: Path, runtime: str) -> None:
    # No descriptor of lbuild, its helper or runc reaches the command (3 is ls's own).
    rc, out = sh(rootfs, runtime, "", argv=("/bin/ls", "/proc/self/fd"))
    assert (rc, out.split()) == (0, ["0", "1", "2", "3"]), out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_dev_mqueue_and_a_read_only_sys_fs_cgroup(rootfs: Path, runtime: str) -> None:
    """Docker's /dev/mqueue (mqueue, nosuid,nodev,noexec) and /sys/fs/cgroup (read-only, the
    RUN's own cgroups): on both paths (the built-in executor had neither)."""
    script = (
        "grep -E ' /dev/mqueue | /sys/fs/cgroup(/[^ ]*)? ' /proc/self/mounts | cut -d' ' -f2-4; "
        "(mkdir /sys/fs/cgroup/lbuild-x) 2>/dev/null && echo cgroup-root-written; "
        "for d in /sys/fs/cgroup/*/; do "
        "  (mkdir ${d}lbuild-x) 2>/dev/null && echo cgroup-written; done; "
        "test -n \"$(ls /sys/fs/cgroup)\" && echo cgroup-listed; "
        "true"
    )
    rc, out = sh(rootfs, runtime, script)
    assert rc == 0, out
    lines = out.splitlines()
    top = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.startswith("/")}  # last wins
    assert top["/dev/mqueue"][0] == "mqueue", lines
    assert {"nosuid", "nodev", "noexec"} <= set(top["/dev/mqueue"][1].split(",")), lines
    cg = {p: m for p, m in top.items() if p.startswith("/sys/fs/cgroup")}
    assert "/sys/fs/cgroup" in cg, lines
    assert all(m[1].split(",")[0] == "ro" for m in cg.values()), lines
    assert any(m[0] in ("cgroup", "cgroup2") for m in cg.values()), lines
    assert "cgroup-listed" in lines
    assert not any(ln.endswith("-written") for ln in lines), lines
