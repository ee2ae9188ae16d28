"""The RUN executor: runs one command in an isolated root filesystem and returns its exit code.

Two paths give the same isolation (Docker's: see builder/solve/policy.py and seccomp.py), and
the same tests run on both (tests/test_isolation.py):

- **runc** (the default where runc is installed and lbuild runs as root): the helper below
  mounts the snapshot and hands runc an OCI bundle (builder/solve/runc.py);
- **built-in** (the fallback, and every rootless run): the helper sets the namespaces up
  itself, and PID 1 of the sandbox execs the command after dropping capabilities and
  loading the seccomp filter.

``LBUILD_RUNTIME=runc|builtin`` (or ``run(runtime=...)``) forces one.

How a run is laid out (each box is a process; the builder is the caller of ``run``)::

    builder ──(spec on a pipe)──> helper: a fresh ``python -I`` (no threads, safe to fork)
      │                             unshare user? (not root), mount, PID, IPC, UTS, net
      │                             (net: not with --network=host)
      └── slirp4netns (default network: serves the helper's network namespace)
                                    built-in:
                                    └── PID 1 of the new PID namespace: mounts the snapshot,
                                          /proc, /dev, /sys, masked paths, /etc files,
                                          pivot_root, then setgroups/setgid, drops the
                                          capabilities, loads seccomp, setuid and execs the
                                          command: PID 1 *is* the command, as under runc
                                    runc:
                                    └── runc run (PID 1 of the new PID namespace)
                                          └── the command (PID 1 of its own)

- Every mount is made inside the helper's private mount namespace: nothing ever appears in
  the host's mount table, and everything goes away with the namespace.
- No host file is reachable from the sandbox: PID 1 is the image's binary (``/proc/1/exe``,
  ``/proc/1/map_files``), the helper is outside the sandbox's PID namespace, and the old
  root is detached (built-in) or never mounted (runc).
- Nothing outlives a run: when the command (PID 1) exits, the kernel kills the rest of its
  PID namespace; the helper dies with the builder (``PR_SET_PDEATHSIG``) and PID 1 (or
  runc) dies with the helper; on an exception in the builder (SIGINT as
  ``KeyboardInterrupt``) ``run`` kills PID 1 and the helper before re-raising.
- ``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/hostname`` are bind-mounted from generated
  files so they never reach the layer; mount points the image lacked (those files, ``/etc``,
  ``/proc``, ``/dev``, ``/sys``, ``/tmp`` or an extra mount's target) are made for the run
  and removed afterwards when still empty, so they do not show in the diff.  ``/tmp`` is not
  a tmpfs: what RUN writes there lands in the layer, as with ``docker build``.
- Network: ``default`` is a network namespace of its own with outbound access through
  slirp4netns (builder/solve/slirp.py); ``none`` has only ``lo``; ``host`` is the host's.
- stdout and stderr of the command are one pipe, streamed to ``on_output``.  The exit code is
  the command's, or 128+N when signal N killed it; an exec failure prints a message and gives
  127 (not found) or 126 (not executable), like a shell.  As under Docker, the command is
  PID 1: signals it sends itself without a handler are ignored.
- Not root: the helper gets a user namespace mapping container root to the caller (and the
  caller's subordinate ids through ``newuidmap``/``newgidmap`` when ``/etc/subuid`` has them).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from builder.solve import policy
from cache.errors import Interrupted, InvalidInput, LbuildError
from cache.snapshots.snapshot import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    Mount,
    mount_all,
    sys_mount,
    sys_umount,
)

if TYPE_CHECKING:
    from builder.solve.slirp import Slirp

__all__ = ["BindSpec", "RunSpec", "choose_runtime", "run"]

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = f"import sys; sys.path.insert(0, {_ROOT!r}); from builder.solve.executor import _helper_main; _helper_main()"
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


@dataclass(frozen=True)
class BindSpec:
    """An extra mount for one run: a host path (``bind``) or an empty ``tmpfs`` at ``target``."""

    source: str | None
    target: str
    type: Literal["bind", "tmpfs"] = "bind"
    readonly: bool = False


@dataclass(frozen=True)
class RunSpec:
    """What to run and as whom: ``argv`` (exec form, already shell-wrapped if need be), ``env``
    (complete, in order), working directory ``cwd`` (made when missing), numeric ``uid``,
    ``gid`` and supplementary ``groups``."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    network: Literal["default", "host", "none"] = "default"
    hostname: str = "lbuild"
    extra_mounts: tuple[BindSpec, ...] = ()
    stdin_data: bytes | None = None


# ---------------------------------------------------------------------------------------
# the builder side
# ---------------------------------------------------------------------------------------
def run(
    spec: RunSpec,
    rootfs_mounts: list[Mount] | Path,
    *,
    on_output: Callable[[bytes], None],
    cancel: threading.Event | None = None,
    runtime: str | None = None,
) -> int:
    """Run ``spec`` in the root filesystem shown by ``rootfs_mounts`` (or a directory); return
    its exit code.  Raises ``LbuildError`` when the sandbox cannot be set up, and
    ``Interrupted`` (after killing the sandbox) once ``cancel`` is set.  ``runtime``:
    ``runc``, ``builtin`` or None (see :func:`choose_runtime`)."""
    _check_spec(spec)
    chosen = choose_runtime(runtime)
    if isinstance(rootfs_mounts, Path):
        mounts = [Mount("bind", str(rootfs_mounts), "/", ("rbind", "rw"))]
    else:
        mounts = list(rootfs_mounts)
    if not mounts or mounts[0].target.strip("/"):
        raise InvalidInput("run: the first root filesystem mount must be the root ('/')")
    rootless = os.geteuid() != 0
    idmap = _id_mapping() if rootless else None
    if idmap is not None and idmap.single and (spec.uid, spec.gid) != (0, 0):
        raise LbuildError(
            f"cannot RUN as uid {spec.uid} gid {spec.gid} without root",
            hint="configure subordinate ids for this user in /etc/subuid and /etc/subgid (newuidmap)",
        )
    run_dir = tempfile.mkdtemp(prefix="lbuild-run-")
    payload = {
        "spec": {**asdict(spec), "stdin_data": None},
        "mounts": [asdict(m) for m in mounts],
        "run_dir": run_dir,
        "rootless": rootless,
        "single_map": bool(idmap and idmap.single),
        "ppid": os.getpid(),
        "files": _etc_files(spec),
        "runtime": chosen,
        "runc": _runc_path() if chosen == "runc" else None,
        "cap_last": _cap_last(),
    }
    try:
        return _Session(payload, spec.stdin_data, idmap, on_output, cancel).run()
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(run_dir)


def choose_runtime(requested: str | None = None) -> str:
    """``"runc"`` or ``"builtin"``: what was asked (argument, else ``LBUILD_RUNTIME``), else runc
    where it can be used (installed, and lbuild is root), else the built-in executor."""
    from builder.solve.runc import available

    want = requested or os.environ.get("LBUILD_RUNTIME") or None
    if want not in (None, "runc", "builtin"):
        raise InvalidInput(f"unknown RUN runtime {want!r} (use runc or builtin)")
    if want == "builtin":
        return "builtin"
    if available() is not None:
        return "runc"
    if want == "runc":
        raise LbuildError(
            "RUN runtime runc is not usable here",
            hint="install runc (and run as root), or use LBUILD_RUNTIME=builtin",
        )
    return "builtin"


def _runc_path() -> str | None:
    from builder.solve.runc import available

    return available()


def _cap_last() -> int:
    """The highest capability number this kernel knows (the bounding set to clear)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def _check_spec(spec: RunSpec) -> None:
    if not spec.argv:
        raise InvalidInput("RUN needs a command")
    if not spec.cwd.startswith("/"):
        raise InvalidInput(f"RUN working directory must be absolute, not {spec.cwd!r}")
    if spec.network not in ("default", "host", "none"):
        raise InvalidInput(f"unknown network mode {spec.network!r} (use default, host or none)")
    for m in spec.extra_mounts:
        if not m.target.startswith("/") or ".." in m.target.split("/"):
            raise InvalidInput(f"mount target must be an absolute path without '..': {m.target!r}")
        if m.type == "bind" and not m.source:
            raise InvalidInput(f"bind mount on {m.target} needs a source")


def _etc_files(spec: RunSpec) -> dict[str, str]:
    resolv = ""
    if spec.network != "none":
        with contextlib.suppress(OSError):
            resolv = Path("/etc/resolv.conf").read_text()
    if spec.network == "default":
        from builder.solve.slirp import resolv_conf

        resolv = resolv_conf(resolv)
    hosts = (
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        f"127.0.1.1\t{spec.hostname}\n"
    )
    return {"hosts": hosts, "resolv.conf": resolv, "hostname": spec.hostname + "\n"}


@dataclass(frozen=True)
class _IdMap:
    """How a rootless run maps ids: one id, or the caller plus subordinate ranges."""

    single: bool
    uid_args: tuple[str, ...] = ()
    gid_args: tuple[str, ...] = ()


def _subid_range(path: str, names: tuple[str, ...]) -> tuple[int, int] | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in names:
            return int(parts[1]), int(parts[2])
    return None


def _id_mapping() -> _IdMap:
    import pwd
    import shutil

    uid, gid = os.getuid(), os.getgid()
    names: tuple[str, ...] = (str(uid),)
    with contextlib.suppress(KeyError):
        names = (pwd.getpwuid(uid).pw_name, str(uid))
    subu = _subid_range("/etc/subuid", names)
    subg = _subid_range("/etc/subgid", names)
    if subu and subg and shutil.which("newuidmap") and shutil.which("newgidmap"):
        return _IdMap(
            single=False,
            uid_args=("0", str(uid), "1", "1", str(subu[0]), str(subu[1])),
            gid_args=("0", str(gid), "1", "1", str(subg[0]), str(subg[1])),
        )
    return _IdMap(single=True)


def _write_id_maps(pid: int, idmap: _IdMap) -> None:
    """Map the helper's new user namespace from outside it (only a parent may)."""
    if not idmap.single:
        for tool, args in (("newuidmap", idmap.uid_args), ("newgidmap", idmap.gid_args)):
            p = subprocess.run([tool, str(pid), *args], capture_output=True, text=True)
            if p.returncode != 0:
                raise LbuildError(
                    f"{tool} failed: {p.stderr.strip()}", hint="check /etc/subuid and /etc/subgid"
                )
        return
    try:
        Path(f"/proc/{pid}/setgroups").write_text("deny")
        Path(f"/proc/{pid}/uid_map").write_text(f"0 {os.getuid()} 1")
        Path(f"/proc/{pid}/gid_map").write_text(f"0 {os.getgid()} 1")
    except OSError as exc:
        raise LbuildError(
            f"cannot map ids in a user namespace: {exc.strerror}",
            hint="run as root, or allow unprivileged user namespaces (sysctl user.max_user_namespaces)",
        ) from exc


class _Session:
    """One run as seen from the builder: starts the helper, pumps its pipes, cleans up."""

    def __init__(
        self,
        payload: dict[str, Any],
        stdin_data: bytes | None,
        idmap: _IdMap | None,
        on_output: Callable[[bytes], None],
        cancel: threading.Event | None = None,
    ) -> None:
        self.payload = payload
        self.cancel = cancel
        self.stdin_data = stdin_data
        self.idmap = idmap
        self.on_output = on_output
        self.init_pid: int | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.runc_error: str | None = None
        self.slirp: Slirp | None = None

    def run(self) -> int:
        spec_r, spec_w = os.pipe()
        status_r, status_w = os.pipe()
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        stdin: int = subprocess.DEVNULL
        in_w = -1
        if self.stdin_data is not None:
            stdin, in_w = os.pipe()
        child_fds = [spec_r, status_w, go_r, out_w] + (
            [stdin] if stdin != subprocess.DEVNULL else []
        )
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(spec_r), str(status_w), str(go_r)],
                stdin=stdin,
                stdout=out_w,
                stderr=out_w,
                pass_fds=(spec_r, status_w, go_r),
                start_new_session=True,  # terminal signals go to the builder, which cleans up
            )
        except BaseException:
            for fd in [*child_fds, spec_w, status_r, go_w, out_r] + ([in_w] if in_w >= 0 else []):
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        writer: threading.Thread | None = None
        try:
            with os.fdopen(spec_w, "w") as f:
                json.dump(self.payload, f)
            if in_w >= 0:
                data = self.stdin_data or b""
                writer = threading.Thread(target=_feed, args=(in_w, data), daemon=True)
                writer.start()
                in_w = -1
            self._pump(proc, status_r, out_r, go_w)
            proc.wait()
        except BaseException:
            self._kill(proc)
            raise
        finally:
            if self.slirp is not None:
                self.slirp.close()
            for fd in (status_r, out_r, go_w, in_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if writer is not None:
                writer.join(timeout=5)
        if self.error is not None:
            raise LbuildError(f"RUN sandbox: {self.error}")
        if self.runc_error is not None:
            from builder.solve.runc import exec_failure_code

            code = exec_failure_code(self.runc_error)
            if code is None:
                raise LbuildError(f"RUN sandbox: runc: {self.runc_error}")
            return code  # runc printed why on the command's stderr
        if self.exit_code is None:
            raise LbuildError(f"RUN sandbox: the executor helper died (status {proc.returncode})")
        return self.exit_code

    def _pump(self, proc: subprocess.Popen[bytes], status_r: int, out_r: int, go_w: int) -> None:
        sel = selectors.DefaultSelector()
        sel.register(out_r, selectors.EVENT_READ, "out")
        sel.register(status_r, selectors.EVENT_READ, "status")
        pending = b""
        open_fds = 2
        while open_fds:
            # A signal reaches the builder's main thread, not this one: poll for its cancel.
            ready = sel.select(timeout=None if self.cancel is None else 0.1)
            if self.cancel is not None and self.cancel.is_set():
                sel.close()
                raise Interrupted("RUN interrupted")
            for key, _ in ready:
                fd = key.fd
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(fd)
                    open_fds -= 1
                    continue
                if key.data == "out":
                    self.on_output(data)
                    continue
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    self._status(line.decode(errors="replace"), proc, go_w)
        sel.close()

    def _status(self, line: str, proc: subprocess.Popen[bytes], go_w: int) -> None:
        word, _, rest = line.partition(" ")
        if word == "pid":
            self.init_pid = int(rest)
        elif word == "userns":
            assert self.idmap is not None
            try:
                _write_id_maps(proc.pid, self.idmap)
            finally:
                os.write(go_w, b"g")
        elif word == "netns":
            # The helper is in the sandbox's network namespace: serve it, then let it go on.
            from builder.solve.slirp import Slirp

            try:
                self.slirp = Slirp(proc.pid, userns=self.idmap is not None)
            except BaseException:
                os.write(go_w, b"x")
                raise
            os.write(go_w, b"g")
        elif word == "runc-error":
            self.runc_error = rest
        elif word == "ready":
            with contextlib.suppress(OSError):
                os.rmdir(self.payload["run_dir"])
        elif word == "exit":
            self.exit_code = int(rest)
        elif word == "error" and self.error is None:
            self.error = rest

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        # Killing PID 1 (the command, or runc) kills its whole PID namespace; the helper
        # then cleans up after it (runc's cgroups, mount stubs) and exits.  A helper that
        # does not is killed too; either way it is reaped.
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


def _feed(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError:
        pass  # the command stopped reading: like a shell, ignore it
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# the helper side (runs in a fresh interpreter: see _BOOT)
# ---------------------------------------------------------------------------------------
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _die_with_parent(parent: int | None, alive_fd: int | None = None) -> None:
    """Get SIGKILL when the parent dies, and exit now if it already has.

    ``parent``: the pid the parent had (checked with getppid); a process whose parent is
    outside its PID namespace sees ppid 0, so it passes ``alive_fd`` instead: the read end of
    a pipe whose write end only the parent holds (EOF means the parent is gone).
    """
    _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    if parent is not None and os.getppid() != parent:
        os._exit(1)
    if alive_fd is not None:
        import select

        readable, _, _ = select.select([alive_fd], [], [], 0)
        if readable:
            os._exit(1)


def _unshare(flags: int) -> None:
    _check(_libc().unshare(flags), "unshare")


def _pivot_root(new_root: str) -> None:
    nr = _SYS_PIVOT_ROOT.get(platform.machine())
    if nr is None:
        raise OSError(0, f"pivot_root: unknown syscall number on {platform.machine()}")
    os.chdir(new_root)
    libc = _libc()
    libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]
    _check(libc.syscall(nr, b".", b"."), "pivot_root")
    # The old root is now stacked on "/": detach it so the host is out of reach.
    sys_umount(".", MNT_DETACH)
    os.chdir("/")


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def _helper_main() -> None:
    """Entry point of the helper process: argv is [spec fd, status fd, go fd]."""
    spec_fd, status_fd, go_fd = (int(a) for a in sys.argv[1:4])
    for fd in (spec_fd, status_fd, go_fd):
        os.set_inheritable(fd, False)
    status = os.fdopen(status_fd, "w", buffering=1)
    # What we make (stubs, /etc files, runc's bundle) gets the modes we ask for, and the
    # command runs under runc's umask: nothing depends on the caller's umask.
    os.umask(0o022)
    try:
        with os.fdopen(spec_fd) as f:
            payload = json.load(f)
        _die_with_parent(payload["ppid"])
        if payload["rootless"]:
            _unshare(CLONE_NEWUSER)
            _wait_go(status, "userns", go_fd)
        network = payload["spec"]["network"]
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if network != "host":
            flags |= CLONE_NEWNET
        _unshare(flags)
        sys_mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        socket.sethostname(payload["spec"]["hostname"])
        if network != "host":
            _loopback_up()
        if network == "default":
            _wait_go(status, "netns", go_fd)  # the builder starts slirp4netns for our netns
        os.close(go_fd)
        os.chdir("/")
        if payload["runtime"] == "runc":
            _runc_helper(payload, status)
        else:
            _builtin_helper(payload, status)
    except BaseException as exc:
        _report(status, f"error {_one_line(exc)}")
    os._exit(0)


def _wait_go(status: Any, word: str, go_fd: int) -> None:
    """Tell the builder ``word`` and wait until it has done its part outside."""
    status.write(word + "\n")
    if os.read(go_fd, 1) != b"g":
        os._exit(1)


def _builtin_helper(payload: dict[str, Any], status: Any) -> None:
    """Fork PID 1 (which becomes the command), wait for it, clean its mount points up."""
    alive_r, alive_w = os.pipe()
    stubs_r, stubs_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            os.close(stubs_r)
            _init_main(payload, status, alive_r, stubs_w)
        except BaseException as exc:
            _report(status, f"error {_one_line(exc)}")
        finally:
            os._exit(255)
    os.close(alive_r)
    os.close(stubs_w)
    status.write(f"pid {pid}\n")
    # PID 1 sends the mount points it made after pivot_root (which moved our root too: we
    # share its mount namespace) and closes the pipe by exec.
    chunks = []
    while chunk := os.read(stubs_r, 65536):
        chunks.append(chunk)
    os.close(stubs_r)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)
    if chunks:
        made = json.loads(b"".join(chunks))
        _Stubs.restore(made).remove("/")
    _report(status, f"exit {code}")


def _runc_helper(payload: dict[str, Any], status: Any) -> None:
    """Mount the snapshot, write the bundle, run runc as PID 1 of our new PID namespace."""
    import uuid

    from builder.solve import runc

    run_dir = payload["run_dir"]
    sys_mount("tmpfs", run_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=4m")
    rootfs, files, bundle, state = (os.path.join(run_dir, d) for d in ("root", "f", "b", "s"))
    for d in (rootfs, files, bundle, state):
        os.mkdir(d, 0o700)
    for name, text in payload["files"].items():
        Path(files, name).write_text(text)
        os.chmod(os.path.join(files, name), 0o644)  # readable by any USER, whatever our umask
    mount_all([Mount(**m) for m in payload["mounts"]], rootfs)
    stubs = _Stubs(rootfs)
    for d in ("/proc", "/dev", "/sys"):
        if stubs.ensure(d, is_dir=True) is None:
            raise OSError(0, f"{d} in the image is not a directory")
    stubs.ensure("/tmp", is_dir=True, mode=0o1777)
    etc = {}
    for name in ("hosts", "resolv.conf", "hostname"):
        if stubs.ensure(f"/etc/{name}", is_dir=False) is not None:
            etc[f"/etc/{name}"] = os.path.join(files, name)
    spec = payload["spec"]
    extra = spec["extra_mounts"]
    for m in extra:
        is_dir = m["type"] == "tmpfs" or os.path.isdir(m["source"])
        if stubs.ensure(m["target"], is_dir=is_dir) is None:
            raise OSError(0, f"cannot mount on {m['target']}: a parent or the target is not usable")
    cid = f"lbuild-{uuid.uuid4().hex[:16]}"
    runc.sweep_cgroups()
    config = runc.bundle_config(spec, rootfs, etc, extra, cgroup=f"/{runc.CGROUP_PARENT}/{cid}")
    Path(bundle, "config.json").write_text(json.dumps(config))
    log = os.path.join(run_dir, "runc.log")
    pid_file = os.path.join(run_dir, "pid")
    argv = [payload["runc"], "--root", state, "--log", log, "--log-format", "json"]
    argv += ["run", "--detach", "--pid-file", pid_file, "--bundle", bundle, cid]
    reaper = os.fork()
    if reaper == 0:
        code = 255
        try:
            code = _runc_reaper(argv, pid_file)
        except BaseException as exc:
            _report(status, f"error cannot run runc: {_one_line(exc)}")
        finally:
            os._exit(code)
    status.write(f"pid {reaper}\n")
    _, st = os.waitpid(reaper, 0)
    code = os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)
    errors = runc.runc_errors(log)
    # runc --detach leaves a stopped container: its state goes with our tmpfs, its cgroups
    # (empty now: the PID namespace is gone) are removed here, as `runc delete` would.
    runc.remove_cgroups(cid)
    stubs.remove(rootfs)
    if errors:
        _report(status, f"runc-error {errors[-1]}")
    _report(status, f"exit {code}")


def _runc_reaper(argv: list[str], pid_file: str) -> int:
    """PID 1 of the helper's new PID namespace: runs ``runc run --detach`` and becomes the
    parent of the container's process when runc exits; returns the command's exit code.

    Why detached: a foreground runc copies the command's stdout and stderr through two pipes
    of its own, which loses their order; detached, the command writes to our output pipe
    itself.  Why a PID namespace: when this process dies (with the helper, with the
    builder: PR_SET_PDEATHSIG), the kernel kills everything below it, runc's container
    included."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    # runc reads /proc/<pid> of its children: a /proc of this PID namespace.
    sys_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    runc_pid = os.posix_spawn(argv[0], argv, dict(os.environ))
    ended: dict[int, int] = {}
    container: int | None = None
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return 255  # runc failed before starting the command (its log says why)
        ended[pid] = os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)
        if pid == runc_pid:
            if ended[pid] != 0:
                return 255
            container = int(Path(pid_file).read_text().strip())
        if container is not None and container in ended:
            return ended[container]


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _report(status: Any, line: str) -> None:
    with contextlib.suppress(OSError):
        status.write(line + "\n")
        status.flush()


class _Stubs:
    """Mount points made for one run, removed afterwards when they are still empty."""

    def __init__(self, rootfs: str) -> None:
        self.rootfs = rootfs
        self.made: list[tuple[str, bool]] = []  # (path inside the rootfs, is_dir)
        self.mounted: list[str] = []

    def _safe(self, rel: str) -> str | None:
        """The host path of ``rel`` in the rootfs, or None if a parent is a symlink/non-dir."""
        parts = [p for p in rel.split("/") if p]
        cur = self.rootfs
        for part in parts[:-1]:
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                self.made.append((cur[len(self.rootfs) :], True))
                continue
            if not stat.S_ISDIR(st.st_mode):
                return None
        return os.path.join(cur, parts[-1])

    def ensure(self, rel: str, *, is_dir: bool, mode: int = 0o755) -> str | None:
        """Make sure ``rel`` exists as a dir or file; None when it cannot be used safely."""
        path = self._safe(rel)
        if path is None:
            return None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if is_dir:
                os.mkdir(path)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644))
            os.chmod(path, mode)
            self.made.append((path[len(self.rootfs) :], is_dir))
            return path
        if is_dir and stat.S_ISDIR(st.st_mode):
            return path
        if not is_dir and stat.S_ISREG(st.st_mode):
            return path
        return None  # a symlink or another type: mounting on it could escape the rootfs

    def mount(
        self,
        source: str | None,
        rel: str,
        fstype: str | None,
        flags: int,
        data: str | None,
        *,
        is_dir: bool,
    ) -> bool:
        path = self.ensure(rel, is_dir=is_dir)
        if path is None:
            return False
        sys_mount(source, path, fstype, flags, data)
        self.mounted.append(path[len(self.rootfs) :])
        return True

    def dump(self) -> bytes:
        return json.dumps({"made": self.made, "mounted": self.mounted}).encode()

    @classmethod
    def restore(cls, data: dict[str, Any]) -> _Stubs:
        stubs = cls("/")
        stubs.made = [(rel, bool(is_dir)) for rel, is_dir in data["made"]]
        stubs.mounted = list(data["mounted"])
        return stubs

    def remove(self, root: str) -> None:
        """Unmount our mounts and remove stubs that are still empty; ``root`` is where the
        root filesystem is seen now ("/" after pivot_root)."""
        base = root.rstrip("/")
        for rel in reversed(self.mounted):
            with contextlib.suppress(OSError):
                sys_umount(base + rel, MNT_DETACH)
        for rel, is_dir in reversed(self.made):
            with contextlib.suppress(OSError):
                if is_dir:
                    os.rmdir(base + rel)
                elif os.lstat(base + rel).st_size == 0:
                    os.unlink(base + rel)


def _setup_rootfs(payload: dict[str, Any]) -> _Stubs:
    run_dir = payload["run_dir"]
    # A private tmpfs holds the mount target and the generated files: it vanishes with the ns.
    sys_mount("tmpfs", run_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=1m")
    rootfs = os.path.join(run_dir, "root")
    os.mkdir(rootfs)
    files = os.path.join(run_dir, "files")
    os.mkdir(files)
    for name, text in payload["files"].items():
        Path(files, name).write_text(text)
        os.chmod(os.path.join(files, name), 0o644)  # readable by any USER, whatever our umask
    # The first mount is the root ("/"): it makes rootfs the mount point pivot_root needs.
    mounts = [Mount(**m) for m in payload["mounts"]]
    mount_all(mounts, rootfs)
    # No device node can be opened but the ones bind-mounted into /dev (CAP_MKNOD is in the
    # set, as in Docker, where the devices cgroup plays this part): nodev everywhere else.
    for m in mounts:
        ro = MS_RDONLY if "ro" in m.options else 0
        where = os.path.join(rootfs, m.target.strip("/"))
        sys_mount(None, where, None, MS_REMOUNT | MS_BIND | MS_NODEV | ro, None)
    stubs = _Stubs(rootfs)
    nsd = MS_NOSUID | MS_NODEV
    if not stubs.mount("proc", "/proc", "proc", nsd | MS_NOEXEC, None, is_dir=True):
        raise OSError(0, "/proc in the image is not a directory")
    if not stubs.mount("tmpfs", "/dev", "tmpfs", nsd | MS_NOEXEC, "mode=755,size=64k", is_dir=True):
        raise OSError(0, "/dev in the image is not a directory")
    _populate_dev(os.path.join(rootfs, "dev"))
    with contextlib.suppress(OSError):
        # sysfs needs a network namespace of our own when we are not root on the host.
        stubs.mount("sysfs", "/sys", "sysfs", nsd | MS_NOEXEC | MS_RDONLY, None, is_dir=True)
    _mask_paths(rootfs)
    stubs.ensure("/tmp", is_dir=True, mode=0o1777)
    for name in ("hosts", "resolv.conf", "hostname"):
        stubs.mount(os.path.join(files, name), f"/etc/{name}", None, MS_BIND, None, is_dir=False)
    for bind in payload["spec"]["extra_mounts"]:
        _extra_mount(stubs, bind)
    return stubs


def _mask_paths(rootfs: str) -> None:
    """Docker's masked paths (a file under /dev/null, a directory under an empty read-only
    tmpfs) and read-only paths, inside the /proc and /sys just mounted."""
    locked = MS_NOSUID | MS_NODEV | MS_NOEXEC
    for rel in policy.MASKED_PATHS:
        path = os.path.join(rootfs, rel.lstrip("/"))
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            sys_mount("tmpfs", path, "tmpfs", locked | MS_RDONLY, "size=0,mode=0555")
        else:
            sys_mount("/dev/null", path, None, MS_BIND, None)
    for rel in policy.READONLY_PATHS:
        path = os.path.join(rootfs, rel.lstrip("/"))
        if not os.path.lexists(path):
            continue
        sys_mount(path, path, None, MS_BIND | MS_REC, None)
        sys_mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked, None)


def _populate_dev(dev: str) -> None:
    for name in _DEV_NODES:
        node = os.path.join(dev, name)
        os.close(os.open(node, os.O_CREAT | os.O_WRONLY, 0o666))
        with contextlib.suppress(OSError):  # e.g. no /dev/tty on the host
            sys_mount(f"/dev/{name}", node, None, MS_BIND, None)
    os.mkdir(os.path.join(dev, "shm"))
    sys_mount(
        "shm",
        os.path.join(dev, "shm"),
        "tmpfs",
        MS_NOSUID | MS_NODEV | MS_NOEXEC,
        "mode=1777,size=64m",
    )
    os.mkdir(os.path.join(dev, "pts"))
    with contextlib.suppress(OSError):
        sys_mount(
            "devpts",
            os.path.join(dev, "pts"),
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        )
    for link, target in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, os.path.join(dev, link))


def _extra_mount(stubs: _Stubs, bind: dict[str, Any]) -> None:
    target = bind["target"]
    if bind["type"] == "tmpfs":
        ok = stubs.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755", is_dir=True)
    else:
        src = bind["source"]
        ok = stubs.mount(src, target, None, MS_BIND | MS_REC, None, is_dir=os.path.isdir(src))
    if not ok:
        raise OSError(0, f"cannot mount on {target}: a parent or the target is not usable")
    if bind["type"] != "tmpfs":  # nodev (see _setup_rootfs), read-only when asked
        path = os.path.join(stubs.rootfs, target.strip("/"))
        ro = MS_RDONLY if bind["readonly"] else 0
        sys_mount(None, path, None, MS_REMOUNT | MS_BIND | MS_NODEV | ro, None)


def _init_main(payload: dict[str, Any], status: Any, alive_fd: int, stubs_fd: int) -> None:
    """PID 1 of the run's PID namespace: sets up the rootfs, then becomes the command."""
    _die_with_parent(None, alive_fd)
    os.close(alive_fd)
    if os.getpid() != 1:
        raise OSError(0, "sandbox init is not PID 1 of a new PID namespace")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    stubs = _setup_rootfs(payload)
    # Compiled while libseccomp is still reachable; loaded just before exec.
    from builder.solve.seccomp import Filter

    seccomp_filter = Filter()
    _pivot_root(stubs.rootfs)
    os.write(stubs_fd, stubs.dump())
    os.close(stubs_fd)
    # The host's run_dir holds no mount of ours any more: the builder may remove it now,
    # so a builder killed later leaves nothing behind.
    _report(status, "ready")
    spec = payload["spec"]
    os.makedirs(spec["cwd"], mode=0o755, exist_ok=True)
    _exec_command(spec, payload, status, seccomp_filter)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities(cap_last: int) -> None:
    """Keep Docker's default set: the bounding set loses every other capability (so no
    setuid or file-capability binary gets one back) and effective = permitted = the set,
    inheritable and ambient empty."""
    libc = _libc()
    pr_capbset_drop, pr_cap_ambient, pr_cap_ambient_clear_all = 24, 47, 4
    for cap in range(cap_last + 1):
        if not policy.CAP_MASK >> cap & 1:
            _check(libc.prctl(pr_capbset_drop, cap, 0, 0, 0), f"drop capability {cap}")
    libc.prctl(pr_cap_ambient, pr_cap_ambient_clear_all, 0, 0, 0)  # EINVAL before Linux 4.3
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    for i in range(2):
        word = (policy.CAP_MASK >> (32 * i)) & 0xFFFFFFFF
        data[i] = _CapData(word, word, 0)
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _exec_command(spec: dict[str, Any], payload: dict[str, Any], status: Any, filt: Any) -> None:
    """PID 1 becomes the user, drops privileges, execs the command; never returns."""
    try:
        os.setsid()
        os.chdir(spec["cwd"])
        groups = list(spec["groups"])
        if not (payload["single_map"] and set(groups) <= {0}):
            os.setgroups(groups)
        os.setgid(spec["gid"])
        filt.load()  # needs CAP_SYS_ADMIN (no_new_privs is not set, as in Docker)
        _drop_capabilities(payload["cap_last"])
        os.setuid(spec["uid"])
        os.umask(0o022)  # runc's (and Docker's), whatever lbuild's own umask is
        # exec keeps ignored signals ignored: give the command default dispositions.
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        env = dict(spec["env"])
    except BaseException as exc:
        _report(
            status, f"error cannot become uid {spec['uid']} gid {spec['gid']}: {_one_line(exc)}"
        )
        os._exit(255)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        os.write(2, f"lbuild: exec {argv[0]}: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)
