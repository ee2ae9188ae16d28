"""The RUN sandbox's own side: the helper process and PID 1 (see builder/solve/executor.py,
whose ``run`` starts ``_helper_main`` in a fresh interpreter and talks to it over pipes).

The helper unshares the namespaces, waits for the builder where it must (user id maps,
slirp4netns), then either hands an OCI bundle to runc (``_runc_helper``) or forks PID 1,
which sets the root filesystem up, pivots into it, drops privileges and execs the command
(``_builtin_helper``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from builder.solve import policy
from cache.snapshots.mount import (
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

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


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
    """Entry point of the helper process: argv is [spec fd, status fd, go fd], and ``net``
    when the builder wants the network namespace made before the spec comes (``Helper``'s
    ``network``: root only, for a run with the default network)."""
    spec_fd, status_fd, go_fd = (int(a) for a in sys.argv[1:4])
    early_net = sys.argv[4:5] == ["net"]
    for fd in (spec_fd, status_fd, go_fd):
        os.set_inheritable(fd, False)
    status = os.fdopen(status_fd, "w", buffering=1)
    # What we make (stubs, /etc files, runc's bundle) gets the modes we ask for, and the
    # command runs under runc's umask: nothing depends on the caller's umask.
    os.umask(0o022)
    try:
        if early_net:
            # slirp4netns starts for it while we wait for the spec and set up
            _unshare(CLONE_NEWNET)
            _loopback_up()
            status.write("netns\n")
            status.flush()
        from builder.solve import runc  # noqa: F401 (loaded before the spec, not after)

        with os.fdopen(spec_fd) as f:
            payload = json.load(f)
        _die_with_parent(payload["ppid"])
        network = payload["spec"]["network"]
        if early_net and (network != "default" or payload["rootless"]):
            raise OSError(0, "a helper with its network made ahead got another run")
        if payload["rootless"]:
            _unshare(CLONE_NEWUSER)
            _wait_go(status, "userns", go_fd)
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        if network != "host" and not early_net:
            flags |= CLONE_NEWNET
        if payload["runtime"] != "runc":  # runc gives the container its own cgroup view
            flags |= CLONE_NEWCGROUP
        _unshare(flags)
        sys_mount(None, "/", None, MS_REC | MS_PRIVATE, None)
        socket.sethostname(payload["spec"]["hostname"])
        if network != "host" and not early_net:
            _loopback_up()
        if network == "default" and not early_net:
            # The builder starts slirp4netns for our netns while we mount the root
            # filesystem; the command starts only once it is there (``ready``).
            status.write("netns\n")
            status.flush()
        ready = _Go(go_fd if network == "default" else None)
        if network != "default":
            os.close(go_fd)
        os.chdir("/")
        if payload["runtime"] == "runc":
            _runc_helper(payload, status, ready)
        else:
            _builtin_helper(payload, status, ready)
    except BaseException as exc:
        _report(status, f"error {_one_line(exc)}")
    os._exit(0)


def _wait_go(status: Any, word: str, go_fd: int) -> None:
    """Tell the builder ``word`` and wait until it has done its part outside."""
    status.write(word + "\n")
    if os.read(go_fd, 1) != b"g":
        os._exit(1)


class _Go:
    """The builder's go-ahead for the command, awaited at the last moment (``wait``): the
    sandbox's network, when it is slirp4netns's, is made while the helper sets up."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def wait(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.read(fd, 1) != b"g":
                os._exit(1)
        finally:
            os.close(fd)

    def drop(self) -> None:
        """Close the descriptor without waiting (a forked child that will not need it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _builtin_helper(payload: dict[str, Any], status: Any, ready: _Go) -> None:
    """Fork PID 1 (which becomes the command), wait for it, clean its mount points up."""
    alive_r, alive_w = os.pipe()
    stubs_r, stubs_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(alive_w)
            os.close(stubs_r)
            _init_main(payload, status, alive_r, stubs_w, ready)
        except BaseException as exc:
            _report(status, f"error {_one_line(exc)}")
        finally:
            os._exit(255)
    os.close(alive_r)
    os.close(stubs_w)
    ready.drop()  # PID 1 waits for it
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


def _runc_helper(payload: dict[str, Any], status: Any, ready: _Go) -> None:
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
    ready.wait()
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
        _mount_cgroups(os.path.join(rootfs, "sys", "fs", "cgroup"))
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


def _host_cgroups() -> dict[str, tuple[str, str]]:
    """The cgroup filesystems mounted at /sys/fs/cgroup ("") or one level under it (name):
    (fstype, superblock options without rw/ro), from this mount namespace's mountinfo."""
    out: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point, fstype, opts = fields[4], fields[sep + 1], fields[sep + 3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            name = "" if point == "/sys/fs/cgroup" else point.removeprefix("/sys/fs/cgroup/")
            if name == point or "/" in name:
                continue
            out[name] = (fstype, ",".join(o for o in opts.split(",") if o not in ("rw", "ro")))
    return out


def _mount_cgroups(target: str) -> None:
    """Docker's read-only /sys/fs/cgroup: the host's cgroup hierarchies as seen from the
    RUN's own cgroup namespace (its cgroups are the roots), nosuid,nodev,noexec,ro.  A
    cgroup v1 or hybrid host's hierarchies go under a tmpfs, made read-only too."""
    if not os.path.isdir(target):
        return
    found = _host_cgroups()
    locked = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if "" in found:  # cgroup v2 only
        fstype, opts = found[""]
        sys_mount(fstype, target, fstype, locked | MS_RDONLY, opts or None)
        return
    sys_mount("tmpfs", target, "tmpfs", locked, "mode=755")
    try:
        for name, (fstype, opts) in sorted(found.items()):
            os.mkdir(os.path.join(target, name), 0o555)
            sys_mount(fstype, os.path.join(target, name), fstype, locked | MS_RDONLY, opts or None)
        with os.scandir("/sys/fs/cgroup") as it:  # cpu -> cpu,cpuacct and the like
            for de in it:
                if de.is_symlink() and de.name not in found:
                    os.symlink(os.readlink(de.path), os.path.join(target, de.name))
        sys_mount(None, target, None, MS_REMOUNT | MS_BIND | locked | MS_RDONLY, None)
    except OSError:
        sys_umount(target, MNT_DETACH)  # never a writable or half-made cgroup tree
        raise


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
    os.mkdir(os.path.join(dev, "mqueue"))
    with contextlib.suppress(OSError):  # the IPC namespace's own POSIX message queues
        sys_mount("mqueue", os.path.join(dev, "mqueue"), "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
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


def _init_main(
    payload: dict[str, Any], status: Any, alive_fd: int, stubs_fd: int, ready: _Go
) -> None:
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
    ready.wait()
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
