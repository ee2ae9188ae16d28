"""The index writer process: a build's index writes, done by a child process.

Why a process: the writes need not happen before the build goes on, and each commit waits
for the disk.  A build's reads are served by :mod:`cache.index.reader` (stdlib ``sqlite3``).
``Recorder.start`` spawns ``python -S -m cache.index.recorder DB``; while the parent walks
the context, plans and writes layers, the child opens the index and applies the writes the
parent sends: through :mod:`cache.index.writer` (stdlib ``sqlite3``) when the index is a
SQLite file with the current schema or none yet (it creates it), else through :class:`cache.index.records.Index`, whose
SQLAlchemy, ORM and models cost about 0.23 CPU-seconds to import (the child used to pay
that on every build, on the core the build's own threads needed).

Protocol (stdin → child, child → stdout): length-prefixed pickles.  The child first greets
(``"serving"``).  A *call* frame ``("call", method, args, kwargs)`` names one of
:data:`WRITE_METHODS` of ``Index``; each call is its own transaction there, exactly as
in-process (a step record still lands only after the parent committed its blobs, since the
parent sends it only then).  A ``("sync",)`` frame asks for a reply: False when every call so
far succeeded, the first error's message when one failed (later calls are skipped), or
``("unapplied", message)`` when the index could not be opened at all.  On end of input the
child applies every whole frame it received, then exits; so a parent killed mid-build leaves
whole records or none, never a half-written one.

Lifecycle and guarantees:

- the child runs in its own session and ignores SIGINT (Ctrl-C in a terminal does not reach
  it: it stops when its input ends, after the frames it already has);
- the build's shared lock on the cache home is held by the child too (an inherited fd in
  ``keep_fds``, or ``lock``: a file the child locks itself when started ahead of the build's
  own lock), so ``cache prune`` cannot start until the child's last write is committed, even
  if the parent died first;
- ``Recorder.close()`` ends the input and waits for the child, raising ``StoreError`` if a
  write failed or the child died (``NothingApplied`` when it applied none of them: the
  caller may apply them itself); ``abandon()`` stops a child that is not needed.

This module imports neither SQLAlchemy nor :mod:`cache.index.records` in the parent.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from cache.errors import StoreError

if TYPE_CHECKING:
    import subprocess

    from cache.index.writer import FastWriter

WRITE_METHODS = frozenset(
    {"put_step", "touch_steps", "put_compressed", "set_tag", "stat_put_many", "add_build"}
)
"""The ``Index`` methods a child may be asked to call (writes only)."""

_HEADER = struct.Struct(">I")
_PIPE_BYTES = 1 << 20
"""Pipe capacity asked for, so that the parent rarely waits while the child is importing."""


def _write_frame(out: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)


def _read_frame(inp: IO[bytes]) -> object | None:
    """The next frame, or None at end of input (a partial last frame counts as the end)."""
    head = inp.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(head)
    data = inp.read(n)
    if len(data) < n:
        return None
    obj: object = pickle.loads(data)
    return obj


class NothingApplied(StoreError):
    """The writer child applied none of the writes (it never started serving, or could not
    open the index): the caller may apply them itself."""


class Writes(Protocol):
    """Where a build's index writes go (``cache.index.buildindex.BuildIndex``): a writer
    child (:class:`Recorder`), or :class:`InlineWrites` in this process."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...
    def abandon(self) -> None: ...


class _Forked:
    """What ``Recorder`` uses of a ``subprocess.Popen`` (its pipes, ``kill``, ``wait``), for a
    writer made by ``Recorder.fork``."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid, self.stdin, self.stdout = pid, stdin, stdout
        self.returncode: int | None = None

    def kill(self) -> None:
        import signal

        os.kill(self.pid, signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Recorder:
    """The parent's end: send writes, ask whether they all succeeded, wait for the child."""

    def __init__(self, proc: subprocess.Popen[bytes] | _Forked) -> None:
        """Wrap a started child; use ``Recorder.start`` or ``Recorder.fork``."""
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self._in: IO[bytes] = proc.stdin
        self._out: IO[bytes] = proc.stdout
        self._broken: str | None = None
        self._closed = False
        self._greeted = False  # the child said it started serving (see ``serve``)

    @classmethod
    def start(
        cls,
        db: str | os.PathLike[str],
        *,
        keep_fds: Sequence[int] = (),
        lock: str | os.PathLike[str] | None = None,
    ) -> Recorder:
        """Spawn the child for the index at ``db`` (a path or SQLAlchemy URL).

        ``lock``: a lock file the child holds shared (``flock``) from its start until its
        last write — for a writer started before its parent took the build's lock.
        """
        import subprocess

        # The child starts with -S (no site module: its .pth files and customisations cost
        # about 25 ms of the child's critical start) and this process's import path instead,
        # with this checkout first so a source tree works too.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in (root, *sys.path) if p))
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-S",
                    "-m",
                    "cache.index.recorder",
                    os.fspath(db),
                    *(["--lock", os.fspath(lock)] if lock is not None else []),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                pass_fds=tuple(keep_fds),
                start_new_session=True,
            )
        except OSError as e:
            raise StoreError(f"cannot start the cache index writer: {e.strerror or e}") from e
        rec = cls(proc)
        rec._grow_pipe()
        return rec

    @classmethod
    def fork(
        cls, db: str | os.PathLike[str], *, lock: str | os.PathLike[str] | None = None
    ) -> Recorder:
        """``start``'s child made by ``fork`` alone, for a process that has imported all the
        writer needs and runs no thread yet (a command in ``lbuild daemon``): no interpreter
        to start, and the writes still happen beside the build, not on its threads."""
        import signal

        r_in, w_in = os.pipe()
        r_out, w_out = os.pipe()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (r_in, w_in, r_out, w_out):
                os.close(fd)
            raise StoreError(f"cannot start the cache index writer: {e.strerror or e}") from e
        if pid == 0:  # the writer
            try:
                os.setsid()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.dup2(r_in, 0)
                os.dup2(w_out, 1)
                for fd in (r_in, w_in, r_out, w_out):
                    os.close(fd)
                main([os.fspath(db), *(["--lock", os.fspath(lock)] if lock is not None else [])])
            finally:
                os._exit(1)
        os.close(r_in)
        os.close(w_out)
        rec = cls(_Forked(pid, os.fdopen(w_in, "wb"), os.fdopen(r_out, "rb")))
        rec._grow_pipe()
        return rec

    def _grow_pipe(self) -> None:
        try:
            import fcntl

            fcntl.fcntl(self._in.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except (OSError, AttributeError):
            pass  # a smaller pipe only means the parent may wait for the child sooner

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Ask the child to call ``Index.<method>(*args, **kwargs)``; does not wait for it."""
        if method not in WRITE_METHODS:
            raise ValueError(f"not an index write: {method}")
        if self._closed:
            raise StoreError("cache index writer is already closed")
        if self._broken is not None:
            return  # reported by sync/close
        try:
            _write_frame(self._in, ("call", method, args, kwargs))
            self._in.flush()
        except (BrokenPipeError, OSError) as e:
            self._broken = f"the cache index writer stopped ({e.strerror or e})"

    def sync(self) -> None:
        """Wait until the child has applied every call so far; raise the first failure
        (``NothingApplied`` when the child applied nothing at all)."""
        if self._broken is None:
            try:
                _write_frame(self._in, ("sync",))
                self._in.flush()
                reply = self._reply()
            except (BrokenPipeError, OSError) as e:
                self._broken = f"the cache index writer stopped ({e.strerror or e})"
            else:
                if reply is None:
                    self._broken = self._death()
                elif isinstance(reply, tuple) and reply[0] == "unapplied":
                    raise NothingApplied(str(reply[1]))
                elif reply is not False:
                    raise StoreError(str(reply))
        if self._broken is not None:
            if not self._greeted:
                raise NothingApplied(self._broken)
            raise StoreError(self._broken)

    def _reply(self) -> object | None:
        """The next reply frame, after the child's greeting (None at end of input)."""
        if not self._greeted:
            hello = _read_frame(self._out)
            if hello != "serving":
                return None
            self._greeted = True
        return _read_frame(self._out)

    def close(self) -> None:
        """Apply everything sent, end the child and wait for it; raise if a write failed."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self._end()

    def abandon(self) -> None:
        """Stop a writer that is not needed after all (started ahead of a build that then
        did not run); nothing must have been sent to it.  Does nothing once closed."""
        if self._closed:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._end()

    def _end(self) -> None:
        """Close both pipes (the child sees the end of its input) and reap the child."""
        self._closed = True
        for f in (self._in, self._out):
            with contextlib.suppress(OSError):
                f.close()
        self._proc.wait()

    def _death(self) -> str:
        code = self._proc.wait()
        return f"the cache index writer exited with status {code} before finishing its writes"


class InlineWrites:
    """A build's index writes applied at once in this process, through a ``FastWriter``
    (:mod:`cache.index.writer`): the writer child's protocol (``Writes``) without the child.

    For a long-lived caller (``lbuild watch``): a child per rebuild costs its interpreter's
    start, and writing through ``Index`` (SQLAlchemy's ORM) cost ~75 ms of a rebuild's reads
    and writes on the build's own threads (py-spy).  As in the child, each call is its own
    transaction, and after a failed one the later calls are skipped and ``sync`` / ``close``
    raise ``StoreError`` with the first failure.  Thread-safe (the solver's workers write)."""

    def __init__(self, writer: FastWriter) -> None:
        """Wrap an open writer; use ``InlineWrites.open``."""
        import threading

        self._w = writer
        self._lock = threading.Lock()
        self._error: str | None = None
        self._closed = False

    @classmethod
    def open(cls, db: str | os.PathLike[str]) -> InlineWrites | None:
        """Writes for the index at ``db`` (made when missing), or None where ``FastWriter``
        does not apply (another schema version, PostgreSQL): the caller uses ``Index``."""
        from cache.index.writer import FastWriter

        w = FastWriter.open(db, create=True)
        return cls(w) if w is not None else None

    def call(self, method: str, *args: object, **kwargs: object) -> None:
        """``FastWriter.<method>(*args, **kwargs)`` now (a write of ``WRITE_METHODS``)."""
        if method not in WRITE_METHODS:
            raise ValueError(f"not an index write: {method}")
        with self._lock:
            if self._closed:
                raise StoreError("cache index writer is already closed")
            if self._error is not None:
                return
            try:
                getattr(self._w, method)(*args, **kwargs)
            except Exception as e:
                self._error = str(e)

    def sync(self) -> None:
        """Raise ``StoreError`` if a write failed."""
        with self._lock:
            if self._error is not None:
                raise StoreError(self._error)

    def close(self) -> None:
        """Close the writer (raising if a write failed)."""
        if self._closed:
            return
        try:
            self.sync()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without reporting; nothing to do once closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._w.close()


class _Replies:
    """The child's answers; a parent that is gone (a closed pipe) stops them, not the writes:
    every whole frame received is still applied."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out: IO[bytes] | None = out

    def send(self, obj: object) -> None:
        if self._out is None:
            return
        try:
            _write_frame(self._out, obj)
            self._out.flush()
        except OSError:  # BrokenPipeError: the parent died
            self._out = None


def serve(db: str, inp: IO[bytes], out: IO[bytes]) -> int:
    """The child's loop: greet, open the index, apply call frames, answer sync frames.

    The greeting tells the parent the child got this far: a child that dies before it
    applied nothing.  A sync answers False (all applied), a message (a write failed: later
    ones were skipped), or ``("unapplied", message)`` (the index could not be opened).
    """
    replies = _Replies(out)
    replies.send("serving")
    error: str | None = None
    unapplied = False
    index: Any = None
    try:
        from cache.index.writer import FastWriter

        # stdlib sqlite3 when the index is a current or new SQLite file (cache.index.writer);
        # SQLAlchemy's Index for anything else (an older schema to migrate, PostgreSQL)
        index = FastWriter.open(db, create=True)
        if index is None:
            from cache.index.records import Index

            index = Index.open(db)
    except Exception as e:  # reported on the next sync, never as a traceback
        error = f"cannot open the cache index: {e}"
        unapplied = True
    try:
        while True:
            frame = _read_frame(inp)
            if frame is None:
                break
            assert isinstance(frame, tuple)
            if frame[0] == "sync":
                reply: object = False
                if error is not None:
                    reply = ("unapplied", error) if unapplied else error
                replies.send(reply)
                continue
            _, method, args, kwargs = frame
            if error is not None or method not in WRITE_METHODS:
                continue
            try:
                getattr(index, method)(*args, **kwargs)
            except Exception as e:
                error = str(e)
    finally:
        if index is not None:
            index.close()
    return 0 if error is None else 1


def main(argv: Sequence[str]) -> int:
    """``python -m cache.index.recorder DB``: serve frames from stdin until it ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the writes end
    args = list(argv)
    if len(args) == 3 and args[1] == "--lock":
        import fcntl

        # held until this process ends: inherited by nothing, released by the kernel
        try:
            fd = os.open(args[2], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:  # an unusable home: the parent reports it, in one line
            os._exit(1)
        fcntl.flock(fd, fcntl.LOCK_SH)
        del args[1:]
    if len(args) != 1:
        print("usage: python -m cache.index.recorder DB [--lock FILE]", file=sys.stderr)
        return 2
    # the protocol gets its own copy of stdout; anything printed goes to stderr instead
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    code = serve(args[0], sys.stdin.buffer, out)
    # Every write is committed and the index closed: skip the interpreter's teardown (about
    # 50 ms with SQLAlchemy loaded), which the parent would otherwise wait for.
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
