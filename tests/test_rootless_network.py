"""A rootless RUN has outbound network too (issue 11 item 1): slirp4netns, run by the
unprivileged caller inside the user namespace, serves the sandbox's own network namespace.

slirp4netns opens /dev/net/tun, which Debian's udev makes 0666; on a machine without udev
(this one) it is 0600 and only root can open it. The test does not change the host's node: it
runs the unprivileged builder in a mount namespace of its own where a 0666 node of the same
device (10:200) is bound over /dev/net/tun, as a standard Debian host has it.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from busybox import make_busybox_rootfs

ROOT = Path(__file__).resolve().parent.parent
CALLER = 65534


def _host_address() -> str | None:
    """An address of this host that is not loopback (what a RUN reaches as "outside")."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    v4 = [a for a in out if ":" not in a and not a.startswith("127.")]
    return v4[0] if v4 else None


def test_rootless_run_reaches_a_host_outside_its_namespace(tmp_path: Path) -> None:
    python = "/usr/bin/python3"
    if os.geteuid() != 0:
        pytest.skip("needs root to set up the unprivileged caller")
    for tool in ("setpriv", "unshare", "slirp4netns"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the unprivileged user")
    try:
        tun = os.stat("/dev/net/tun")
    except FileNotFoundError:
        pytest.skip("the kernel has no /dev/net/tun (slirp4netns needs a tap device)")
    addr = _host_address()
    if addr is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect to")

    area = Path(tempfile.mkdtemp(prefix="lbuild-rootless-net-"))
    srv = socket.create_server((addr, 0))
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        srv.settimeout(60)
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hello from outside\n")
            got.append(b"accepted")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        os.chmod(area, 0o755)
        rootfs = make_busybox_rootfs(area / "rootfs")
        subprocess.run(["chown", "-R", "-h", f"{CALLER}:{CALLER}", str(rootfs)], check=True)
        node = area / "tun"
        os.mknod(node, stat.S_IFCHR | 0o666, tun.st_rdev)
        os.chmod(node, 0o666)
        code = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from builder.solve.executor import RunSpec, run
            out = []
            s = RunSpec(argv=("/bin/sh", "-c", "nc {addr} {port} </dev/null; echo rc=$?"),
                        env=(("PATH", "/bin"),), cwd="/", uid=0, gid=0, groups=(),
                        network="default")
            print(run(s, Path({str(rootfs)!r}), on_output=out.append))
            print(b"".join(out).decode().strip().replace(chr(10), " "))
            """
        )
        script = (
            f"mount --bind {node} /dev/net/tun && exec setpriv --reuid {CALLER} "
            f"--regid {CALLER} --clear-groups {python} -c \"$0\""
        )
        p = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, code],
            capture_output=True, text=True, cwd="/",
            env={"PATH": os.environ["PATH"], "HOME": str(area)}, timeout=120,
        )  # fmt: skip
        if "cannot map ids" in p.stderr or "unshare" in p.stderr:
            pytest.skip(f"no unprivileged user namespaces here: {p.stderr.strip()[-200:]}")
        assert p.returncode == 0, p.stderr
        rc, output = p.stdout.splitlines()
        assert rc == "0", output
        assert "hello from outside" in output and "rc=0" in output
        assert got == [b"accepted"]
        # the host's node is as it was
        assert os.stat("/dev/net/tun").st_mode == tun.st_mode
    finally:
        srv.close()
        shutil.rmtree(area, ignore_errors=True)
