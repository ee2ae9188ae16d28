"""The client side of ``lbuild daemon`` (``builder.daemon``): what every command line runs
first, so it imports nothing but ``os``, ``sys`` and the interpreter's built-in ``_socket``
and ``_signal``.  The standard library's ``json``, ``socket``, ``signal`` and ``contextlib``
cost an interpreter started without site hooks ~10 ms before anything else (a bare start is
~8 ms here), and a command handed to the daemon does nothing else in this process.

The request (after a 4-byte length, sent with the three standard descriptors as
``SCM_RIGHTS``) is NUL-separated bytes: the format's name, the working directory, the umask,
the code fingerprint, the number of arguments, the arguments, then ``NAME=value`` for every
environment variable.  None of these can hold a NUL, and ``os.fsencode`` gives back the very
bytes the process got from the kernel, so the command sees what it would have seen here.
The daemon answers ``pid N`` once the command runs and ``exit N`` when it ended, or a line
that starts with ``refused``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs the client ~2 ms to import
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, NoReturn

ENV_SOCKET = "LBUILD_DAEMON_SOCKET"
HEADER = 4
"""Bytes of the request's length, sent before it."""
MAX_REQUEST = 16 << 20
FORMAT = b"lbuild-request/2"


def socket_path() -> str | None:
    """The daemon's socket: ``$LBUILD_DAEMON_SOCKET`` (empty: none), else
    ``$XDG_RUNTIME_DIR/lbuild/daemon.sock``, else ``/tmp/lbuild-<uid>/daemon.sock``."""
    given = os.environ.get(ENV_SOCKET)
    if given is not None:
        return given or None
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "lbuild") if runtime else f"/tmp/lbuild-{os.geteuid()}"
    return os.path.join(base, "daemon.sock")


def code_fingerprint() -> str:
    """The interpreter and lbuild's source files (path, size, mtime) this process runs."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = [sys.executable, sys.version, root]
    for pkg in ("builder", "cache"):
        stack = [os.path.join(root, pkg)]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.name != "__pycache__":
                            stack.append(e.path)
                    elif e.name.endswith(".py"):
                        st = e.stat(follow_symlinks=False)
                        lines.append(f"{e.path} {st.st_size} {st.st_mtime_ns}")
    lines[3:] = sorted(lines[3:])
    return "\n".join(lines)


def exit_now(code: int) -> NoReturn:
    """Flush stdout and stderr and end the process at once (``os._exit``: no interpreter
    teardown, which only costs time once every resource is released; in a daemon's child,
    never a return into the daemon's loop)."""
    try:
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105 (contextlib is an import more for every command line)
                stream.flush()
            except (OSError, ValueError):
                pass
    finally:
        os._exit(code)


def encode_request(
    argv: list[str], cwd: str, env: Mapping[str, str], umask: int, code: str
) -> bytes:
    """The request's bytes (see the module docstring); ValueError when a string cannot be
    sent (a NUL, or a character its own file system encoding cannot give back)."""
    fields: list[str] = [cwd, str(umask), code, str(len(argv)), *argv]
    fields += [f"{k}={v}" for k, v in env.items()]
    out = [FORMAT]
    for f in fields:
        b = os.fsencode(f)  # UnicodeEncodeError is a ValueError
        if b"\0" in b:
            raise ValueError("a NUL in the command line or the environment")
        out.append(b)
    return b"\0".join(out)


def decode_request(body: bytes) -> dict[str, Any] | None:
    """What ``encode_request`` encoded: ``argv``, ``cwd``, ``env``, ``umask``, ``code``; None
    for anything else."""
    parts = body.split(b"\0")
    if len(parts) < 5 or parts[0] != FORMAT:
        return None
    try:
        umask, argc = int(parts[2]), int(parts[4])
    except ValueError:
        return None
    if not 0 <= argc <= len(parts) - 5 or not parts[1]:
        return None
    env: dict[str, str] = {}
    for item in parts[5 + argc :]:
        name, sep, value = item.partition(b"=")
        if not sep or not name:
            return None
        env[os.fsdecode(name)] = os.fsdecode(value)
    return {
        "argv": [os.fsdecode(a) for a in parts[5 : 5 + argc]],
        "cwd": os.fsdecode(parts[1]),
        "env": env,
        "umask": umask,
        "code": os.fsdecode(parts[3]),
    }


def delegate(argv: list[str]) -> int | None:
    """Run the command line ``argv`` in the daemon, when one serves this code: its exit
    status; None when the command is to run in this process (no daemon, another code, a
    ``daemon`` command, standard streams that are not open)."""
    import _socket

    if argv[:1] == ["daemon"]:
        return None
    path = socket_path()
    if path is None:
        return None
    try:
        fds = [fd for fd in (0, 1, 2) if os.fstat(fd)]
        cwd = os.getcwd()
    except OSError:
        return None
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            s.connect(path)
            # Only a daemon of our own user gets our environment and streams: a socket
            # another user put where ours would be is left alone.
            creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        except OSError:
            return None
        if int.from_bytes(creds[4:8], sys.byteorder) != os.geteuid():
            return None
        return _delegate(s, argv, cwd, fds)
    finally:
        s.close()


def _delegate(s: Any, argv: list[str], cwd: str, fds: list[int]) -> int | None:
    import _signal  # type: ignore[import-not-found]  # signal.py's C module (no stubs)
    import _socket

    umask = os.umask(0)
    os.umask(umask)
    try:
        body = encode_request(argv, cwd, os.environ, umask, code_fingerprint())
    except ValueError:
        return None
    # From here Ctrl-C belongs to the command: held until its pid is known, then passed on.
    target: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not target:
            pending.append(signum)
            return
        try:  # noqa: SIM105 (as in exit_now)
            os.kill(target[0], signum)
        except OSError:
            pass

    handled = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
    before = {sig: _signal.signal(sig, forward) for sig in handled}
    replies = bytearray()
    try:
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        s.sendmsg(
            [len(body).to_bytes(HEADER, "big")],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)],
        )
        s.sendall(body)
        first = _line(s, replies)
        pid = int(first[4:]) if first.startswith(b"pid ") else None
    except (OSError, ValueError):
        pid = None
    if pid is None:  # refused (another code), or a daemon going away: nothing ran
        for sig, handler in before.items():
            _signal.signal(sig, handler)
        if pending:  # interrupted before anything ran
            print("lbuild: interrupted", file=sys.stderr)
            return 130
        return None
    target.append(pid)
    for signum in pending:
        forward(signum, None)
    try:
        last = _line(s, replies)
        return int(last[5:]) if last.startswith(b"exit ") else _gone()
    except (OSError, ValueError):
        return _gone()


def _line(s: Any, buf: bytearray) -> bytes:
    """The next line the daemon sent (OSError when it closed the connection first)."""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("the lbuild daemon closed the connection")
        buf += chunk
    end = buf.index(b"\n") + 1
    line = bytes(buf[:end])
    del buf[:end]
    return line


def _gone() -> int:
    print("lbuild: error: the lbuild daemon stopped before the command ended", file=sys.stderr)
    return 1
