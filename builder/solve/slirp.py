"""Outbound network for a RUN step's own network namespace: slirp4netns (user-mode TCP/IP).

The sandbox gets a tap device ``tap0`` with 10.0.2.100/24, the gateway 10.0.2.2 and a DNS
forwarder at 10.0.2.3; its connections leave from the host's network namespace as ordinary
sockets of the slirp4netns process, as with rootless Docker and podman.  It cannot reach the
host's loopback (``--disable-host-loopback``: 10.0.2.2 does not lead to 127.0.0.1), runs
in its own sandbox (``--enable-sandbox``: a mount namespace of its own, capabilities
dropped) under its own seccomp filter, and exits when the builder closes its ``--exit-fd``
pipe, or dies.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import threading

from cache.errors import LbuildError

__all__ = ["DNS", "Slirp", "resolv_conf"]

DNS = "10.0.2.3"
_READY_TIMEOUT_S = 30.0


class Slirp:
    """A running slirp4netns serving the network namespace of process ``pid``."""

    def __init__(self, pid: int, *, userns: bool = False) -> None:
        exe = shutil.which("slirp4netns")
        if exe is None:
            raise LbuildError(
                "RUN needs slirp4netns for its network (outbound access from its own network "
                "namespace)",
                hint="install slirp4netns, or use RUN --network=none",
            )
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        self._exit_w = exit_w
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as slirp4netns)
        args = [
            exe,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            f"--ready-fd={ready_w}",
            f"--exit-fd={exit_r}",
        ]
        if userns:
            args.append(f"--userns-path=/proc/{pid}/ns/user")
        args += [str(pid), "tap0"]
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                pass_fds=(ready_w, exit_r),
                start_new_session=True,
            )
        except BaseException:
            for fd in (ready_r, ready_w, exit_r, exit_w):
                os.close(fd)
            self._log.close()
            raise
        os.close(ready_w)
        os.close(exit_r)
        try:
            readable, _, _ = select.select([ready_r], [], [], _READY_TIMEOUT_S)
            ok = bool(readable) and os.read(ready_r, 1) == b"1"
        finally:
            os.close(ready_r)
        if not ok:
            self._log.seek(0)
            text = self._log.read().decode(errors="replace")
            self.close()
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            why = "; ".join(lines[-3:]) if lines else f"exit status {self.proc.returncode}"
            raise LbuildError(f"RUN network: slirp4netns failed: {why}")

    def close(self, *, wait: bool = True) -> None:
        """Stop slirp4netns (closing its exit pipe) and reap it; with ``wait=False`` the
        reaping is left to a thread of its own (the run's namespace is gone already, so
        nothing waits for slirp4netns to finish exiting; the interpreter joins the thread
        before it exits, so no process outlives the builder)."""
        if self._exit_w >= 0:
            os.close(self._exit_w)
            self._exit_w = -1
        if not wait:
            threading.Thread(target=self._reap, name="slirp-reap").start()
            return
        self._reap()

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(OSError):
            self._log.close()


def resolv_conf(host_text: str) -> str:
    """The sandbox's resolv.conf: the host's, minus loopback name servers (unreachable from
    the sandbox, as in Docker); slirp4netns's forwarder when none is left."""
    out: list[str] = []
    servers = 0
    for line in host_text.splitlines():
        words = line.split()
        if words and words[0] == "nameserver":
            if len(words) < 2 or words[1].startswith("127.") or words[1] == "::1":
                continue
            servers += 1
        out.append(line)
    if servers == 0:
        out.append(f"nameserver {DNS}")
    return "\n".join(out) + "\n"
