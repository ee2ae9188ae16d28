"""``lbuild watch``: build once, then rebuild whenever the context, Dockerfile or ignore file changes.

Vocabulary: a *change* is one relevant filesystem event (created, modified, deleted or moved
path) that survived the filter: paths excluded by the .dockerignore, the outputs being written
and lbuild's own home never count.  A *rebuild* is one ``builder.api.build`` call that takes
every change pending when it starts.

Lifecycle: the watchdog observer thread only records changes and writes a byte to a wake-up
pipe.  The main thread owns everything else: it waits (in ``select``, so idle costs no CPU)
until changes have been quiet for the debounce period, builds, reports one summary line, and
restarts the ``--exec`` command.  Changes that arrive during a build are pending when it ends,
so they cause exactly one more build.  SIGINT/SIGTERM stops the watcher: a running build is
aborted (as Ctrl-C aborts ``lbuild build``), the ``--exec`` command is stopped and the observer
joined before exit.

Correctness never depends on the events: every rebuild re-plans and re-selects the whole
context, and the stat index makes unchanged files cost one ``lstat``; the events only decide
*when* to build and what the summary says changed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

# builder.progress imports only the standard library: cheap enough to import eagerly
# the command line's defaults are defined with the parser, in builder/cli.py
from builder.cliargs import DEFAULT_DEBOUNCE_MS, DEFAULT_EXEC_GRACE_S
from builder.progress import JsonReporter, PlainReporter, Reporter
from cache.errors import LbuildError

if TYPE_CHECKING:
    from builder.frontend.dockerignore import IgnoreRules
    from builder.options import BuildOptions, BuildResult
    from builder.plan.dag import Step

ChangeKind = Literal["created", "modified", "deleted", "moved"]


SUMMARY_PATHS = 3  # paths named in a plain summary line before "(+N more)"
JSON_PATHS = 100  # paths listed in a JSON summary; "changed_count" has the total

_MARK: dict[str, str] = {"created": "+", "modified": "~", "deleted": "-"}


@dataclass(frozen=True)
class Change:
    """One relevant filesystem change; ``path`` is context-relative ('/'-separated) when inside it."""

    kind: ChangeKind
    path: str
    dest: str | None = None  # the new name of a moved path

    def describe(self) -> str:
        if self.kind == "moved":
            return f"{self.path} -> {self.dest}"
        return _MARK[self.kind] + self.path

    def as_json(self) -> dict[str, str]:
        out = {"kind": self.kind, "path": self.path}
        if self.dest is not None:
            out["dest"] = self.dest
        return out


@dataclass(frozen=True)
class Rebuild:
    """The outcome of one watch build: what changed, what ran, the image or the error."""

    number: int
    changes: tuple[Change, ...]  # empty for the initial build
    ok: bool
    seconds: float
    steps_total: int = 0
    steps_cached: int = 0
    digest: str | None = None
    error: str | None = None

    @property
    def steps_rebuilt(self) -> int:
        return self.steps_total - self.steps_cached

    def changed_text(self) -> str:
        if self.number == 1 and not self.changes:
            return "initial build"
        names = [c.describe() for c in self.changes[:SUMMARY_PATHS]]
        more = len(self.changes) - len(names)
        return "changed: " + ", ".join(names) + (f" (+{more} more)" if more else "")

    def line(self) -> str:
        """The one plain summary line of this rebuild."""
        head = f"[watch] #{self.number} {self.changed_text()}"
        if not self.ok:
            return f"{head} | FAILED after {self.seconds:.2f}s: {self.error} | waiting for changes"
        return (
            f"{head} | {self.steps_rebuilt} rebuilt, {self.steps_cached} cached | "
            f"{self.seconds:.2f}s | {self.digest}"
        )

    def as_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "event": "rebuild",
            "build": self.number,
            "ok": self.ok,
            "initial": self.number == 1 and not self.changes,
            "changed": [c.as_json() for c in self.changes[:JSON_PATHS]],
            "changed_count": len(self.changes),
            "seconds": round(self.seconds, 4),
        }
        if self.ok:
            obj.update(
                digest=self.digest,
                steps=self.steps_total,
                cached=self.steps_cached,
                rebuilt=self.steps_rebuilt,
            )
        else:
            obj["error"] = self.error
        return obj


class WatchReporter(Reporter, Protocol):
    """A build progress reporter that also prints the watcher's summaries and notices."""

    def rebuild(self, r: Rebuild) -> None: ...
    def notice(self, event: str, text: str, **fields: Any) -> None: ...


class PlainWatchReporter(PlainReporter):
    """Plain lines on stderr: RUN output and step errors as they happen, one summary per rebuild."""

    def step_start(self, step: Step) -> None:
        pass

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        if error:  # a watcher's lines are summaries; only failures get their own line
            super().step_done(step, cached=cached, seconds=seconds, error=error)

    def finish(self, result: BuildResult) -> None:
        pass  # the rebuild summary says it

    def rebuild(self, r: Rebuild) -> None:
        self._print(r.line())

    def notice(self, event: str, text: str, **fields: Any) -> None:
        self._print(f"[watch] {text}")


class JsonWatchReporter(JsonReporter):
    """JSON lines on stdout: every build event, then one ``rebuild`` object per rebuild."""

    def rebuild(self, r: Rebuild) -> None:
        self._emit(r.as_json())

    def notice(self, event: str, text: str, **fields: Any) -> None:
        self._emit({"event": event, "text": text, **fields})


def make_watch_reporter(mode: str) -> WatchReporter:
    """``json`` gives JSON lines on stdout; ``plain`` and ``auto`` give summary lines on stderr."""
    if mode == "json":
        return JsonWatchReporter()
    return PlainWatchReporter()


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class ChangeFilter:
    """Decides whether a path event is relevant, and names it for the summary.

    Relevant: the Dockerfile and both ignore-file candidates always; any other path inside
    the context unless the ignore rules exclude it (a directory stays relevant when a ``!``
    pattern could re-include something below it); never the outputs lbuild writes (nor their
    temporary siblings) nor lbuild's home, so exporting into the context cannot loop.
    """

    def __init__(self, context: Path, dockerfile: Path, skip: Sequence[Path]) -> None:
        self.context = os.path.abspath(context)
        self.dockerfile = os.path.abspath(dockerfile)
        self.ignore_files = (
            self.dockerfile + ".dockerignore",
            os.path.join(self.context, ".dockerignore"),
        )
        self.skip = tuple(os.path.abspath(p) for p in skip)
        self._rules: IgnoreRules | None = None
        self._lock = threading.Lock()
        self.reload()

    def reload(self) -> None:
        """Re-read the ignore rules; malformed rules exclude nothing (the build reports them)."""
        from builder.frontend.dockerignore import IgnoreRules, load_ignore

        try:
            rules, _ = load_ignore(Path(self.context), Path(self.dockerfile))
        except LbuildError:
            rules = IgnoreRules()
        with self._lock:
            self._rules = rules

    def is_control(self, path: str) -> bool:
        """The Dockerfile or an ignore file: always relevant."""
        return path == self.dockerfile or path in self.ignore_files

    def _skipped(self, path: str) -> bool:
        for s in self.skip:
            if _under(path, s) or path == s + ".tmp":
                return True
            # exports build beside their destination in ".NAME.*" and rename into place
            head, name = os.path.split(path)
            if head == os.path.dirname(s) and name.startswith("." + os.path.basename(s) + "."):
                return True
        return False

    def name(self, path: str, *, is_dir: bool) -> str | None:
        """The summary name of ``path`` when a change to it is relevant, else None."""
        if self.is_control(path):
            return self._display(path)
        if not _under(path, self.context) or path == self.context or self._skipped(path):
            return None
        rel = os.path.relpath(path, self.context).replace(os.sep, "/")
        with self._lock:
            rules = self._rules
        assert rules is not None
        if rules.excluded(rel) and not (is_dir and rules.may_include_below(rel)):
            return None
        return rel

    def _display(self, path: str) -> str:
        if _under(path, self.context) and path != self.context:
            return os.path.relpath(path, self.context).replace(os.sep, "/")
        return path


class PendingChanges:
    """Changes recorded by the observer thread and taken by the main thread, with a wake-up pipe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes: dict[str, Change] = {}
        self._last = 0.0
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)

    def add(self, change: Change) -> None:
        key = change.dest if change.dest is not None else change.path
        with self._lock:
            old = self._changes.get(key)
            if old is not None and old.kind == "created" and change.kind == "modified":
                change = old  # a new file being written is still "created"
            self._changes.pop(key, None)  # re-insert: the summary lists paths in event order
            self._changes[key] = change
            self._last = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe: the reader is awake anyway
            os.write(self._write_fd, b"x")

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def quiet_for(self) -> float | None:
        """Seconds since the last change, or None when nothing is pending."""
        with self._lock:
            if not self._changes:
                return None
            return time.monotonic() - self._last

    def take(self) -> tuple[Change, ...]:
        with self._lock:
            out = tuple(self._changes.values())
            self._changes.clear()
            return out

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


def _handler(flt: ChangeFilter, pending: PendingChanges, report: Callable[[str], None]) -> Any:
    """A watchdog event handler feeding ``pending`` through ``flt``."""
    from watchdog.events import FileSystemEventHandler

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            try:
                self._handle(event)
            except Exception as err:  # an observer thread that dies would stop watching
                report(f"internal error handling {event!r}: {err}")

        def _handle(self, event: Any) -> None:
            kind = event.event_type
            src = os.fsdecode(event.src_path)
            dest = os.fsdecode(event.dest_path) if event.dest_path else ""
            if src in flt.ignore_files or dest in flt.ignore_files:
                flt.reload()  # before filtering anything else with the old rules
            is_dir = bool(event.is_directory)
            if kind == "moved":
                a = flt.name(src, is_dir=is_dir)
                b = flt.name(dest, is_dir=is_dir) if dest else None
                if a is not None and b is not None:
                    pending.add(Change("moved", a, b))
                elif a is not None:
                    pending.add(Change("deleted", a))
                elif b is not None:
                    pending.add(Change("created", b))
                return
            name = flt.name(src, is_dir=is_dir)
            if name is None:
                return
            if kind == "closed":
                kind = "modified"
            if kind in ("created", "modified", "deleted"):
                pending.add(Change(kind, name))

    return Handler()


def _event_filter() -> list[Any]:
    """The watchdog event classes we listen to; it also narrows the inotify mask.

    Opens and reads are left out so that a build reading the context triggers nothing, and
    directory "modified" events are left out because inotify reports one on a directory for
    every change inside it (the change itself arrives as its own event).
    """
    from watchdog import events as ev

    return [
        ev.FileCreatedEvent,
        ev.DirCreatedEvent,
        ev.FileModifiedEvent,
        ev.FileDeletedEvent,
        ev.DirDeletedEvent,
        ev.FileMovedEvent,
        ev.DirMovedEvent,
        ev.FileClosedEvent,
    ]


class ExecRunner:
    """Runs ``--exec CMD`` after a successful build, stopping the previous run first."""

    def __init__(
        self, command: str, grace: float, *, stdout: IO[str] | None, report: Callable[..., None]
    ) -> None:
        self.command = command
        self.grace = grace
        self.stdout = stdout
        self.report = report
        self.proc: subprocess.Popen[bytes] | None = None
        self.digest: str | None = None

    def start(self, digest: str, output: Path | None, config_digest: str) -> None:
        """Run CMD for the image ``digest`` unless it is already running for that image."""
        if self.proc is not None and self.proc.poll() is None and digest == self.digest:
            self.report("exec", "image unchanged: command left running", pid=self.proc.pid)
            return
        self.stop()
        env = dict(os.environ)
        env["LBUILD_IMAGE_DIGEST"] = digest
        env["LBUILD_CONFIG_DIGEST"] = config_digest
        env["LBUILD_OUTPUT"] = str(output.resolve()) if output is not None else ""
        # its own session, so stopping it reaches every process the command started
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", self.command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.stdout,
            start_new_session=True,
        )
        self.digest = digest
        self.report("exec", f"started: {self.command} (pid {self.proc.pid})", pid=self.proc.pid)

    def stop(self) -> None:
        """SIGTERM the command's process group, then SIGKILL it after the grace period."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid
        running = proc.poll() is None
        _killpg(pgid, signal.SIGTERM)  # also reaches children left behind by an exited shell
        if not running:
            return
        try:
            proc.wait(timeout=self.grace)
            code = proc.returncode
            self.report("exec", f"stopped (exit {code})", pid=pgid, status=code)
        except subprocess.TimeoutExpired:
            _killpg(pgid, signal.SIGKILL)
            proc.wait()
            self.report("exec", f"killed after {self.grace:g}s grace", pid=pgid, status="killed")


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class WatchOptions:
    """What ``lbuild watch`` takes beyond the build options."""

    debounce: float = DEFAULT_DEBOUNCE_MS / 1000
    exec_command: str | None = None
    exec_grace: float = DEFAULT_EXEC_GRACE_S


class Watcher:
    """The watch loop: observe, debounce, build, summarise, exec; see the module docstring."""

    def __init__(
        self,
        opts: BuildOptions,
        wopts: WatchOptions,
        reporter: WatchReporter,
        *,
        exec_stdout: IO[str] | None = None,
    ) -> None:
        from cache.errors import NotFound
        from cache.home import home_dir

        if not opts.context.is_dir():
            raise NotFound(f"build context not found: {opts.context}")
        self.opts = opts
        self.wopts = wopts
        self.reporter = reporter
        self.dockerfile = (
            opts.dockerfile if opts.dockerfile is not None else opts.context / "Dockerfile"
        )
        skip = [o.dest for o in opts.outputs] + [home_dir(opts.home)]
        self.filter = ChangeFilter(opts.context, self.dockerfile, skip)
        self.pending = PendingChanges()
        self.tocs: dict[Any, Any] = {}  # layer TOCs by diff_id, kept across rebuilds
        self.runner = (
            ExecRunner(
                wopts.exec_command, wopts.exec_grace, stdout=exec_stdout, report=reporter.notice
            )
            if wopts.exec_command
            else None
        )
        self.builds = 0
        self.stopping = False
        self.building = False
        self._signal_r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_r, False)
        os.set_blocking(self._signal_w, False)

    # -- signals -----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # No printing here: the handler may have interrupted this thread inside the
        # reporter's lock.  Idle, the loop sees the flag (the wake-up fd ends its select).
        self.stopping = True
        if self.building:
            # Abort the build as Ctrl-C aborts `lbuild build`: the solver cancels running
            # RUN steps and nothing half-written reaches the store or the outputs.
            raise KeyboardInterrupt

    # -- observer ----------------------------------------------------------------------
    def _start_observer(self) -> Any:
        from watchdog.observers import Observer

        handler = _handler(
            self.filter, self.pending, lambda text: self.reporter.notice("error", text)
        )
        ctx = os.path.abspath(self.opts.context)
        dirs = [(ctx, True)]
        for extra in {
            os.path.dirname(self.filter.dockerfile),
            os.path.dirname(self.filter.ignore_files[0]),
        }:
            if not _under(extra, ctx):
                dirs.append((extra, False))
        try:
            observer = Observer()
            for path, recursive in dirs:
                observer.schedule(handler, path, recursive=recursive, event_filter=_event_filter())
            observer.start()
            return observer
        except OSError as err:
            # inotify's watch or instance limit: polling is the only way left to notice changes
            from watchdog.observers.polling import PollingObserver

            self.reporter.notice("warning", f"inotify unavailable ({err}); polling every second")
            observer = PollingObserver(timeout=1.0)
            for path, recursive in dirs:
                observer.schedule(handler, path, recursive=recursive, event_filter=_event_filter())
            observer.start()
            return observer

    # -- loop --------------------------------------------------------------------------
    def run(self) -> int:
        """Watch until SIGINT or SIGTERM; returns the exit code (0)."""
        old_handlers = {
            s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
        }
        old_fd = signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        observer = None
        sel = selectors.DefaultSelector()
        try:
            # observe first: a change made while the first build runs must not be lost
            observer = self._start_observer()
            sel.register(self.pending.read_fd, selectors.EVENT_READ)
            sel.register(self._signal_r, selectors.EVENT_READ)
            self.reporter.notice(
                "watching",
                f"watching {self.opts.context} (Ctrl-C to stop)",
                context=str(self.opts.context),
            )
            self._build(())
            while True:
                changes = self._wait(sel)
                if changes is None:
                    break
                self._build(changes)
        except KeyboardInterrupt:
            self.reporter.notice("stopping", "build aborted")
        finally:
            signal.set_wakeup_fd(old_fd)
            if self.runner is not None:
                self.runner.stop()
            if observer is not None:
                observer.stop()
                observer.join()
            sel.close()
            self.pending.close()
            os.close(self._signal_r)
            os.close(self._signal_w)
            for s, h in old_handlers.items():
                signal.signal(s, h)
        self.reporter.notice("stopped", f"stopped after {self.builds} build(s)", builds=self.builds)
        return 0

    def _wait(self, sel: selectors.BaseSelector) -> tuple[Change, ...] | None:
        """Block until changes have been quiet for the debounce period; None when stopping."""
        while not self.stopping:
            quiet = self.pending.quiet_for()
            if quiet is not None and quiet >= self.wopts.debounce:
                return self.pending.take()
            timeout = None if quiet is None else self.wopts.debounce - quiet
            for key, _ in sel.select(timeout):
                if key.fd == self.pending.read_fd:
                    self.pending.drain()
                else:
                    _drain(self._signal_r)
        return None

    def _build(self, changes: tuple[Change, ...]) -> None:
        from builder.api import build

        self.builds += 1
        t0 = time.monotonic()
        self.building = True
        result: BuildResult | None = None
        error: str | None = None
        try:
            # a long-lived process: index reads and writes here, through the stdlib sqlite3
            # (no writer child per rebuild, no SQLAlchemy ORM on the build's threads)
            result = build(self.opts, self.reporter, memo=False, tocs=self.tocs, writer="fast")
        except LbuildError as err:
            if self.stopping:  # the build reports our own interrupt as its error
                raise KeyboardInterrupt from None
            error = str(err)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a bug must not kill the watcher either; say what it was
            if self.stopping:
                raise KeyboardInterrupt from None
            error = f"internal error: {type(err).__name__}: {err}"
        finally:
            self.building = False
        seconds = time.monotonic() - t0
        if result is None:
            self.reporter.rebuild(Rebuild(self.builds, changes, False, seconds, error=error))
            return
        self.reporter.rebuild(
            Rebuild(
                self.builds,
                changes,
                True,
                seconds,
                result.steps_total,
                result.steps_cached,
                str(result.manifest_digest),
            )
        )
        if self.runner is not None and not self.stopping:
            out = self.opts.outputs[0].dest if self.opts.outputs else None
            try:
                self.runner.start(str(result.manifest_digest), out, str(result.config_digest))
            except OSError as err:
                self.reporter.notice("error", f"--exec failed to start: {err}")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


# -- command line ----------------------------------------------------------------------------
def cmd_watch(ns: argparse.Namespace, opts: BuildOptions) -> int:
    """``lbuild watch`` with the build options the command line gave: returns 0 after a
    clean shutdown."""
    wopts = WatchOptions(
        debounce=ns.debounce / 1000, exec_command=ns.exec_command, exec_grace=ns.exec_grace
    )
    reporter = make_watch_reporter(ns.progress)
    # JSON lines own stdout: the command's output goes to stderr then
    exec_out = sys.stderr if ns.progress == "json" else None
    return Watcher(opts, wopts, reporter, exec_stdout=exec_out).run()
