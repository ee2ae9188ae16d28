"""``lbuild daemon``: a resident fork server for the command line (issue 16).

An ``lbuild build`` spends a third of an edit rebuild before its first step: starting the
interpreter, importing lbuild and its libraries (~0.1 s of the bench's 0.37 s), most of it
the same work every time.  The classic Docker builder pays none of it: its daemon is
resident.  ``lbuild daemon`` is lbuild's: it imports everything a build uses once, then
waits on a Unix socket.  Each ``lbuild`` command line that finds it sends its arguments,
working directory, environment, umask and standard streams (the descriptors themselves,
``SCM_RIGHTS``) and the daemon forks a child that becomes that command: same streams, same
directory, same environment, same umask, its own session, then the ordinary ``lbuild``
code path (``builder.cli.run``).  The daemon never builds anything itself and holds no
cache state, no index connection and no lock: every command runs exactly as it would
without it, only without the start-up.

- **Who may use it**: a client talks only to a daemon of its own user (the listener's
  ``SO_PEERCRED``: a socket another user made where the daemon's would be gets nothing);
  the socket is in a directory only its user can enter
  (``$XDG_RUNTIME_DIR/lbuild``, else ``/tmp/lbuild-<uid>``: created 0700; one owned by
  someone else, or open to others, is refused), the socket itself is 0600, and every
  connection's peer credentials (``SO_PEERCRED``) must be the daemon's own user: a command
  runs with the rights of the user who started it, never anyone else's.
- **Which code runs**: a client sends a fingerprint of the code it would run itself (the
  interpreter, and every ``.py`` file of ``builder/`` and ``cache/`` with its size and
  mtime); a daemon started from other code refuses, and the command runs in-process.
- **Signals**: the terminal's Ctrl-C reaches the client, which passes SIGINT, SIGTERM and
  SIGHUP on to the command; a client that dies (SIGKILL) makes the daemon interrupt its
  command as Ctrl-C would.  The exit status comes back from the daemon, which reaps the
  command (one killed by a signal N is 128+N, as a shell says).
- **Opting out**: ``LBUILD_DAEMON_SOCKET=`` (empty) runs every command in-process; set to
  a path, it names the daemon's socket (``lbuild daemon --socket`` listens there).  With no
  daemon listening, the command line runs in-process as it always has (the connection
  attempt costs ~0.1 ms).

A command line's first code (``builder/entry.py``) asks
:func:`builder.daemon_client.delegate`, which imports only ``os``, ``sys`` and the built-in
``_socket`` and ``_signal`` until the command has run (that module describes the request).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys

from builder.daemon_client import (
    ENV_SOCKET,
    HEADER,
    MAX_REQUEST,
    code_fingerprint,
    decode_request,
    delegate,
    exit_now,
    socket_path,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["code_fingerprint", "delegate", "exit_now", "serve", "socket_path"]

# What a build imports, loaded once by the daemon (a module missing here is imported by
# the command that needs it, as without a daemon).
PRELOAD = (
    "builder.cli",
    "builder.api",
    "builder.noop",
    "builder.options",
    "builder.progress",
    "builder.images",
    "builder.pull",
    "builder.frontend.dockerfile",
    "builder.frontend.dockerignore",
    "builder.plan.planner",
    "builder.plan.context",
    "builder.plan.dag",
    "builder.plan.copyspec",
    "builder.plan.keys",
    "builder.solve.solver",
    "builder.solve.run",
    "builder.solve.executor",
    "builder.solve.prefetch",
    "builder.solve.stepcache",
    "builder.solve.runc",
    "builder.solve.seccomp",
    "builder.solve.slirp",
    "builder.solve.clockgate",
    "builder.export.oci",
    "cache.session",
    "cache.index.buildindex",
    "cache.index.reader",
    "cache.index.recorder",
    "cache.index.statindex",
    "cache.layers.tar",
    "cache.layers.tarread",
    "cache.layers.toc",
    "cache.layers.tocapply",
    "cache.layers.apply",
    "cache.layers.compress",
    "cache.layers.view",
    "cache.layers.retar",
    "cache.remote.spec",
    "cache.snapshots.snapshot",
    "cache.snapshots.overlay",
    "cache.snapshots.reuse",
    "cache.snapshots.verify",
    "cache.store.blobs",
    "blake3",
    "isal.igzip",
    "csv",
)
# Never ``dockerfile`` (BuildKit's parser): it is Go, and loading it starts the Go runtime's
# threads, which a fork does not carry over; a command imports it in its own child.


# --- the daemon -------------------------------------------------------------------------------
def serve(path: str | None, run_command: Callable[[], None]) -> int:
    """Listen on ``path`` (default :func:`socket_path`) until SIGTERM or SIGINT, running
    each client's command line in a child of its own with ``run_command`` (the command
    line's ``builder.cli.run``, which exits); the exit status of the daemon."""
    from cache.errors import InvalidInput, StoreError

    where = path or socket_path()
    if where is None:
        raise InvalidInput(f"no socket for the daemon: {ENV_SOCKET} is empty (give --socket)")
    _private_dir(os.path.dirname(os.path.abspath(where)), made_here=path is None)
    listener = _listen(where)
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            listener.close()
            os.unlink(where)
            raise StoreError(f"the daemon cannot load {name}: {exc}") from exc
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork would leave the other threads' locks held in every child
        listener.close()
        os.unlink(where)
        raise StoreError(f"the daemon runs {threads} threads after loading its modules, not 1")
    try:
        return _Server(listener, where, code_fingerprint(), run_command).run()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(where)


def _private_dir(d: str, *, made_here: bool) -> None:
    """The socket's directory: made 0700 when it is lbuild's default; refused when another
    user owns it or others may write to it (anyone could then swap the socket)."""
    import stat

    from cache.errors import InvalidInput

    if made_here:
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    try:
        st = os.lstat(d)
    except OSError as exc:
        raise InvalidInput(f"daemon socket directory {d}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise InvalidInput(
            f"daemon socket directory {d} must be a directory of this user that no one else "
            "can write to"
        )


def _listen(path: str) -> socket.socket:
    from cache.errors import InvalidInput

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket left by a daemon that was killed
    else:
        raise InvalidInput(f"an lbuild daemon already listens on {path}")
    finally:
        probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is made 0600
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(64)
    return s


class _Server:
    """The daemon's loop: accept, check, fork; reap, report; interrupt orphaned commands."""

    def __init__(
        self, listener: socket.socket, path: str, code: str, run_command: Callable[[], None]
    ) -> None:
        import selectors

        self.run_command = run_command
        self.listener = listener
        self.path = path
        self.code = code
        self.sel = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}
        self.by_conn: dict[int, int] = {}
        self.stopping = False

    def run(self) -> int:
        import gc
        import selectors
        import signal

        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

        def stop(*_: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        gc.collect()
        gc.freeze()  # the children leave the preloaded objects' pages shared
        print(f"lbuild daemon: listening on {self.path}", file=sys.stderr, flush=True)
        try:
            while not (self.stopping and not self.children):
                if self.stopping:
                    self._stop_listening()
                for key, _ in self.sel.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept(wake_r, wake_w)
                    elif key.data == "wake":
                        try:
                            while os.read(wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._client_gone(key.fileobj)  # type: ignore[arg-type]
                self._reap()
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    def _stop_listening(self) -> None:
        if self.listener.fileno() >= 0:
            self.sel.unregister(self.listener)
            self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def _accept(self, wake_r: int, wake_w: int) -> None:
        import struct

        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            conn.settimeout(10)
            pid_uid_gid = conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            _, uid, _ = struct.unpack("3i", pid_uid_gid)
            if uid != os.geteuid():
                _log(f"refused a client of uid {uid}")
                conn.sendall(b"refused another user\n")
                conn.close()
                return
            req, fds = _read_request(conn)
        except (OSError, ValueError):
            conn.close()
            return
        if req is None or len(fds) != 3 or req.get("code") != self.code:
            _log("refused a client of other code" if req is not None else "refused a bad request")
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(b"refused another code\n" if req is not None else b"refused\n")
            conn.close()
            return
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: the client runs it itself
            _log(f"cannot fork: {exc.strerror}")
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.sendall(b"refused cannot fork\n")
            conn.close()
            return
        if pid == 0:
            _become_command(
                req,
                fds,
                self.run_command,
                keep=conn.fileno(),
                close=[wake_r, wake_w, self.sel, self.listener, *self.children.values()],
            )
        for fd in fds:
            os.close(fd)
        _log(f"pid {pid}: lbuild {' '.join(req['argv'][:1])}")
        self.children[pid] = conn
        with contextlib.suppress(OSError):
            conn.sendall(b"pid %d\n" % pid)
        import selectors

        self.by_conn[conn.fileno()] = pid
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def _client_gone(self, conn: socket.socket) -> None:
        """A client's connection is readable: it sends nothing more, so it has gone (killed,
        or its terminal closed): interrupt its command as Ctrl-C would."""
        import signal

        pid = self.by_conn.pop(conn.fileno(), None)
        self.sel.unregister(conn)
        if pid is not None:
            _log(f"pid {pid}: its client went away: interrupted")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGINT)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                code = 128 - code
            _log(f"pid {pid}: exit {code}")
            if self.by_conn.pop(conn.fileno(), None) is not None:
                self.sel.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(b"exit %d\n" % code)
            conn.close()


def _log(line: str) -> None:
    """One line on the daemon's standard error: what it ran (the subcommand, never the
    arguments: they may hold build args) and what it refused."""
    with contextlib.suppress(OSError, ValueError):
        print(f"lbuild daemon: {line}", file=sys.stderr, flush=True)


def _read_request(conn: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    head, fds, _flags, _addr = socket.recv_fds(conn, HEADER, 3)
    if len(head) != HEADER:
        return None, fds
    size = int.from_bytes(head, "big")
    if size > MAX_REQUEST:
        return None, fds
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            return None, fds
        chunks.append(chunk)
        got += len(chunk)
    return decode_request(b"".join(chunks)), fds


def _become_command(
    req: dict[str, Any],
    fds: list[int],
    run_command: Callable[[], None],
    *,
    keep: int,
    close: list[Any],
) -> None:
    """In the forked child: take the client's streams, directory, environment and umask,
    then run its command line (``builder.cli.run`` as the daemon was given it); never
    returns."""
    code = 1
    try:
        import signal

        os.setsid()  # the daemon's terminal, if any, is not the command's
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for c in close:
            if isinstance(c, int):
                os.close(c)
            else:
                c.close()
        os.close(keep)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_stdio()
        os.environ.clear()
        os.environ.update(req["env"])
        os.umask(req["umask"] & 0o777)
        os.chdir(req["cwd"])
        sys.argv = [sys.argv[0], *req["argv"]]
        if "random" in sys.modules:
            sys.modules["random"].seed()  # not the daemon's sequence in every child
        run_command()  # exits
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:
        with contextlib.suppress(Exception):
            print(f"lbuild: error: the daemon could not run the command: {exc}", file=sys.stderr)
    finally:
        exit_now(code)


def _reopen_stdio() -> None:
    """New ``sys.stdin/stdout/stderr`` over descriptors 0-2 (now the client's), buffered as
    a fresh interpreter would: line by line on a terminal."""
    import io

    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        tty = os.isatty(fd)
        if fd == 0:
            raw: Any = io.BufferedReader(io.FileIO(fd, "rb", closefd=False))
        else:
            raw = io.BufferedWriter(io.FileIO(fd, "wb", closefd=False))
        stream = io.TextIOWrapper(
            raw,
            encoding=getattr(old, "encoding", None) or "utf-8",
            errors=getattr(old, "errors", None) or "strict",
            line_buffering=tty or fd == 2,
            write_through=fd == 2,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
