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

    builder ──(spec on a pipe)──> helper: a fresh ``python -I -S`` (stdlib only, no threads)
      │                             unshare user? (not root), mount, PID, IPC, UTS, net
      │                             (net: not with --network=host), cgroup (built-in)
      └── slirp4netns (default network: serves the helper's network namespace)
                                    built-in:
                                    └── PID 1 of the new PID namespace: mounts the snapshot,
                                          /proc, /dev (+ mqueue), /sys (+ cgroup, ro),
                                          masked paths, /etc files,
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
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cache.errors import Interrupted, InvalidInput, LbuildError
from cache.snapshots.snapshot import (
    Mount,
)

if TYPE_CHECKING:
    from builder.solve.slirp import Slirp

__all__ = ["BindSpec", "Helper", "RunSpec", "choose_runtime", "run"]

_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = f"import sys; sys.path.insert(0, {_ROOT!r}); from builder.solve.sandbox import _helper_main; _helper_main()"


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
    helper: Helper | None = None,
) -> int:
    """Run ``spec`` in the root filesystem shown by ``rootfs_mounts`` (or a directory); return
    its exit code.  Raises ``LbuildError`` when the sandbox cannot be set up, and
    ``Interrupted`` (after killing the sandbox) once ``cancel`` is set.  ``runtime``:
    ``runc``, ``builtin`` or None (see :func:`choose_runtime`); ``helper``: one started
    ahead (:class:`Helper`), used by this run (one started for the wrong stdin is
    replaced)."""
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
        return _Session(payload, spec.stdin_data, idmap, on_output, cancel).run(helper)
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


class Helper:
    """The executor's helper process, started before its run is known: a RUN step starts it
    first and prepares its snapshot while the interpreter starts (``run(helper=...)``).

    Until it gets its spec the helper only waits on a pipe; ``discard`` (or the builder's
    death) closes that pipe and the helper exits without doing anything.

    With ``network`` (a helper started ahead, as root) the helper makes the run's network
    namespace before it gets the spec, and a thread of ours starts slirp4netns for it as
    soon as it says so: a run with the default network then no longer waits ~11 ms for
    slirp4netns to start.  Such a helper serves only runs with the default network
    (``fits``); any other gets a helper of its own."""

    def __init__(self, *, stdin: bool, network: bool = False) -> None:
        self.stdin = stdin
        self.network = network
        self.slirp: Slirp | None = None
        self.network_error: LbuildError | None = None
        self.early: list[str] = []  # status lines the network thread read that were not its
        self._net: threading.Thread | None = None
        spec_r, self._spec_w = os.pipe()
        status_r, status_w = os.pipe()
        go_r, self._go_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self._status_r = status_r
        stdin_fd: int = subprocess.DEVNULL
        self._in_w = -1
        if stdin:
            stdin_fd, self._in_w = os.pipe()
        child_fds = [spec_r, status_w, go_r, out_w] + ([stdin_fd] if stdin else [])
        mine = [self._spec_w, status_r, self._go_w, self._out_r] + ([self._in_w] if stdin else [])
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _BOOT, str(spec_r), str(status_w), str(go_r)]
                + (["net"] if network else []),
                stdin=stdin_fd,
                stdout=out_w,
                stderr=out_w,
                pass_fds=(spec_r, status_w, go_r),
                start_new_session=True,  # terminal signals go to the builder, which cleans up
            )
        except BaseException:
            for fd in child_fds + mine:
                os.close(fd)
            raise
        for fd in child_fds:
            os.close(fd)
        if network:
            self._net = threading.Thread(
                target=self._serve_network, args=(self.proc.pid,), name="helper-net"
            )
            self._net.start()

    def fits(self, *, stdin: bool, network: str, rootless: bool) -> bool:
        """Whether this helper can serve a run with (or without) ``stdin``, on ``network``
        (``RunSpec.network``), rootless or not."""
        early_ok = network == "default" and not rootless
        return self.stdin == stdin and (early_ok or not self.network)

    def _serve_network(self, pid: int) -> None:
        """The thread of a ``network`` helper: its first status line is ``netns`` once its
        network namespace exists; slirp4netns is started for it, and the helper told to go
        on ("g") or not ("x").  Any other line (an error) is left for the run to report."""
        from builder.solve.slirp import Slirp

        line = bytearray()
        while not line.endswith(b"\n"):  # a byte at a time: nothing past the line is ours
            try:
                b = os.read(self._status_r, 1)
            except OSError:
                return
            if not b:
                break
            line += b
        text = line.decode(errors="replace").rstrip("\n")
        if text != "netns":
            if text:
                self.early.append(text)
            return
        answer = b"x"
        try:
            self.slirp = Slirp(pid)
            answer = b"g"
        except LbuildError as exc:
            self.network_error = exc
        except Exception as exc:  # e.g. out of descriptors: the run reports it, one line
            self.network_error = LbuildError(f"RUN network: cannot start slirp4netns: {exc}")
        finally:
            with contextlib.suppress(OSError):  # a helper discarded meanwhile has gone
                os.write(self._go_w, answer)

    def _join(self) -> None:
        if self._net is not None:
            self._net.join()
            self._net = None

    def take(self) -> tuple[subprocess.Popen[bytes], int, int, int, int, int]:
        """The process and the builder's ends of its pipes (spec, status, go, output,
        stdin or -1), handed over once (for a ``network`` helper, once its network is
        served: ``slirp``, or ``network_error``)."""
        proc = self.proc
        if proc is None:
            raise LbuildError("RUN sandbox: the executor helper was already used")
        self._join()
        self.proc = None
        return proc, self._spec_w, self._status_r, self._go_w, self._out_r, self._in_w

    def discard(self) -> None:
        """Stop an unused helper: it reads an empty spec and exits (and its slirp4netns,
        if it has one, with it)."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        with contextlib.suppress(OSError):
            os.close(self._spec_w)  # the helper exits: the network thread reads its end
        self._join()
        for fd in (self._status_r, self._go_w, self._out_r, self._in_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self.slirp is not None:
            self.slirp.close(wait=False)
            self.slirp = None


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
        self.network_error: LbuildError | None = None
        self.runc_error: str | None = None
        self.slirp: Slirp | None = None

    def run(self, helper: Helper | None = None) -> int:
        fits = helper is not None and helper.fits(
            stdin=self.stdin_data is not None,
            network=self.payload["spec"]["network"],
            rootless=self.payload["rootless"],
        )
        if helper is None or not fits:
            if helper is not None:
                helper.discard()
            helper = Helper(stdin=self.stdin_data is not None)
        proc, spec_w, status_r, go_w, out_r, in_w = helper.take()
        # a helper that made its network namespace ahead: slirp4netns serves it already
        self.slirp, self.network_error = helper.slirp, helper.network_error
        helper.slirp = None
        writer: threading.Thread | None = None
        try:
            for line in helper.early:
                self._status(line, proc, go_w)
            # a helper that failed before it read its spec has gone: what it said (or its
            # exit) is reported below, not the broken pipe
            with contextlib.suppress(BrokenPipeError), os.fdopen(spec_w, "w") as f:
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
                # the helper (and the namespace slirp4netns served) is gone: stop it, and
                # reap it on a thread while the builder goes on with the diff
                self.slirp.close(wait=self.exit_code is None)
            for fd in (status_r, out_r, go_w, in_w):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if writer is not None:
                writer.join(timeout=5)
        if self.error is not None:
            raise LbuildError(f"RUN sandbox: {self.error}")
        if self.network_error is not None:
            raise self.network_error
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

            # The helper goes on setting up meanwhile and waits for the answer only before
            # the command starts: if slirp4netns fails because the helper already failed
            # (and left its namespace), the helper's own error is the one to report.
            try:
                self.slirp = Slirp(proc.pid, userns=self.idmap is not None)
            except LbuildError as exc:
                self.network_error = exc
                with contextlib.suppress(OSError):
                    os.write(go_w, b"x")
                return
            except BaseException:
                with contextlib.suppress(OSError):
                    os.write(go_w, b"x")
                raise
            with contextlib.suppress(OSError):  # a helper that failed meanwhile has gone
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
