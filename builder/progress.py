"""Progress views: a live rich view on a terminal, plain lines otherwise, JSON lines, or none.

Every step gets a start event and one last event that says whether it was cached; the
last line names the image digest.  Reporters are called from worker threads.

A RUN step's output is prefixed with its short id (the ``[stage 3/7]`` part of its name):
the instruction itself is named once, on the line before its first output.  Long byte
transfers (compression, export, pulls, pushes) report through ``transfer``.  ``fail`` is
the build's end when it does not finish: ``--progress json`` ends with one ``error``
event, the live view closes (no stale line) and marks running steps interrupted.

The no-op path must not import rich: only :class:`RichReporter` does, when it is made.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from builder.options import BuildResult
    from builder.plan.dag import Step


class Reporter(Protocol):
    """Progress sink."""

    def step_start(self, step: Step) -> None: ...
    def step_log(self, step: Step, data: bytes) -> None: ...
    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None: ...
    def message(self, text: str) -> None: ...
    def finish(self, result: BuildResult) -> None: ...


def _visible(step: Step) -> bool:
    return step.kind not in ("end",)


def short_id(step: Any) -> str:
    """``[stage-0 3/7]`` of ``[stage-0 3/7] RUN make``; the step id when there is none."""
    name = str(getattr(step, "name", ""))
    if name.startswith("[") and "]" in name:
        return name[: name.index("]") + 1]
    return f"[{step.id}]"


def interrupted(error: str | None) -> bool:
    """Whether a step's error is the build being interrupted (not the step failing)."""
    return error is not None and error.rstrip().endswith("interrupted")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class PlainReporter:
    """One line per event, for logs and pipes."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self.lock = threading.Lock()
        self.partial: dict[str, bytes] = {}
        self.named: set[str] = set()  # steps whose instruction line is out

    def _print(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def step_start(self, step: Step) -> None:
        pass

    def _log_lines(self, step: Step, lines: list[bytes]) -> None:
        if step.id not in self.named:
            self.named.add(step.id)
            self._print(step.name)
        sid = short_id(step)
        for line in lines:
            self._print(f"{sid} | {line.decode(errors='replace')}")

    def step_log(self, step: Step, data: bytes) -> None:
        buf = self.partial.get(step.id, b"") + data
        *lines, rest = buf.split(b"\n")
        self.partial[step.id] = rest
        if lines:
            self._log_lines(step, lines)

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        if not _visible(step):
            return
        rest = self.partial.pop(step.id, b"")
        if rest:
            self._log_lines(step, [rest])
        if interrupted(error):
            self._print(f"{step.name} INTERRUPTED {seconds:.2f}s")
        elif error:  # the error itself is the CLI's one line; here only which step failed
            self._print(f"{step.name} FAILED")
        elif cached:
            self._print(f"{step.name} CACHED")
        else:
            self._print(f"{step.name} DONE {seconds:.2f}s")

    def step_bytes(self, step: Step, done: int, total: int) -> None:
        """Bytes a long COPY/ADD has written so far: nothing here (its DONE line follows)."""

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        """Bytes moved by a long operation (kind "pull", "push", "compress", "export"): one
        line when it is complete."""
        if done >= total:
            self._print(f"{kind} {digest[:19]} done ({total} bytes)")

    def message(self, text: str) -> None:
        self._print(text)

    def fail(self, message: str, code: int, *, file: str | None, line: int | None) -> None:
        pass  # the CLI prints the error line

    def finish(self, result: BuildResult) -> None:
        self._print(
            f"{result.steps_cached}/{result.steps_total} steps cached, {result.seconds:.2f}s"
        )
        self._print(f"image {result.manifest_digest}")
        for ref in result.pushed:
            self._print(f"pushed {ref}")


class QuietReporter(PlainReporter):
    """``-q``: nothing but errors (which the CLI prints)."""

    def _print(self, text: str) -> None:
        pass


class JsonReporter:
    """One JSON object per line on stdout."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout
        self.lock = threading.Lock()

    def _emit(self, obj: dict[str, Any]) -> None:
        obj.setdefault("time", round(time.time(), 3))
        with self.lock:
            self.out.write(json.dumps(obj, sort_keys=True) + "\n")
            self.out.flush()

    def step_start(self, step: Step) -> None:
        if _visible(step):
            self._emit({"event": "step_start", "id": step.id, "name": step.name, "key": step.key})

    def step_log(self, step: Step, data: bytes) -> None:
        self._emit({"event": "log", "id": step.id, "data": data.decode(errors="replace")})

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        if not _visible(step):
            return
        obj: dict[str, Any] = {
            "event": "step_done",
            "id": step.id,
            "name": step.name,
            "key": step.key,
            "cached": cached,
            "seconds": round(seconds, 4),
        }
        if error:
            obj["error"] = error
            if interrupted(error):
                obj["interrupted"] = True
        self._emit(obj)

    def step_bytes(self, step: Step, done: int, total: int) -> None:
        """A long COPY/ADD's bytes: ``{"event": "copy", "id", "name", "done", "total"}``."""
        self._emit(
            {"event": "copy", "id": step.id, "name": step.name, "done": done, "total": total}
        )

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        """Bytes moving: ``{"event": kind, "digest", "done", "total"}``."""
        self._emit({"event": kind, "digest": digest, "done": done, "total": total})

    def message(self, text: str) -> None:
        self._emit({"event": "message", "text": text})

    def fail(self, message: str, code: int, *, file: str | None, line: int | None) -> None:
        """The stream's last event when the build does not finish (``done`` when it does)."""
        self._emit(
            {"event": "error", "message": message, "file": file, "line": line, "exit_code": code}
        )

    def finish(self, result: BuildResult) -> None:
        done: dict[str, Any] = {
            "event": "done",
            "digest": result.manifest_digest,
            "config": result.config_digest,
            "steps": result.steps_total,
            "cached": result.steps_cached,
            "seconds": round(result.seconds, 4),
        }
        if result.pushed:
            done["pushed"] = list(result.pushed)
        self._emit(done)


class RichReporter(PlainReporter):
    """A live view on a terminal (``rich.progress``): one line per running step with a
    spinner and a ticking timer, a byte counter for long transfers; finished steps and RUN
    output scroll above it.  It is transient: closing it leaves no live line behind."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        from rich.console import Console
        from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn
        from rich.text import Text

        class Elapsed(ProgressColumn):
            """Seconds with a tenth, so a running step visibly ticks."""

            max_refresh = 0.1

            def render(self, task: Any) -> Text:
                return Text(f"{task.elapsed or 0.0:.1f}s", style="progress.elapsed")

        class Bytes(ProgressColumn):
            def render(self, task: Any) -> Text:
                if not task.fields.get("bytes"):
                    return Text("")
                total = f"/{human(task.total)}" if task.total else ""
                return Text(f"{human(task.completed)}{total}", style="progress.download")

        self.console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            Bytes(),
            Elapsed(),
            console=self.console,
            transient=True,
            refresh_per_second=10,
        )
        self.tasks: dict[str, Any] = {}
        self.closed = False
        self.progress.start()

    def _print(self, text: str) -> None:
        with self.lock:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def step_start(self, step: Step) -> None:
        if _visible(step):
            with self.lock:
                if not self.closed:
                    self.tasks[step.id] = self.progress.add_task(step.name, total=None)

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        with self.lock:
            task = self.tasks.pop(step.id, None)
            if task is not None and not self.closed:
                self.progress.remove_task(task)
                self.progress.refresh()  # else the next print redraws the removed line
        super().step_done(step, cached=cached, seconds=seconds, error=error)

    def step_bytes(self, step: Step, done: int, total: int) -> None:
        """A long COPY/ADD's byte counter, on its own step line."""
        with self.lock:
            task = self.tasks.get(step.id)
            if task is not None and not self.closed:
                self.progress.update(task, completed=done, total=total, bytes=True)
                self.progress.refresh()  # drawn now: a copy may end before the next tick

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        key = f"{kind} {digest}"
        with self.lock:
            if self.closed:
                return
            task = self.tasks.get(key)
            if task is None:
                label = f"{kind} {digest[7:19]}"
                task = self.tasks[key] = self.progress.add_task(
                    label, total=total, bytes=True, transfer=True
                )
            self.progress.update(task, completed=done, total=total)
            if done >= total:
                self.progress.remove_task(self.tasks.pop(key))
                self.progress.refresh()

    def close(self, *, interrupt: bool = False) -> None:
        with self.lock:
            if self.closed:
                return
            running = list(self.progress.tasks)
            self.closed = True
            self.progress.stop()
            self.tasks.clear()
        if interrupt:
            for t in running:
                if not t.fields.get("transfer"):  # a step, with or without a byte counter
                    self.out.write(f"{t.description} INTERRUPTED {t.elapsed or 0.0:.2f}s\n")
            self.out.flush()

    def fail(self, message: str, code: int, *, file: str | None, line: int | None) -> None:
        self.close(interrupt=code in (130, 143))

    def finish(self, result: BuildResult) -> None:
        self.close()
        super().finish(result)


def make_reporter(mode: str) -> Reporter:
    """``auto`` picks the live view on a terminal and plain lines otherwise; ``quiet``
    prints nothing."""
    if mode == "json":
        return JsonReporter()
    if mode == "quiet":
        return QuietReporter()
    if mode == "auto" and sys.stderr.isatty():
        return RichReporter()
    return PlainReporter()
