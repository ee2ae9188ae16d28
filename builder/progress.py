"""Progress views: a live rich view on a terminal, plain lines otherwise, or JSON lines.

Every step gets a start event and one last event that says whether it was cached; the
last line names the image digest.  Reporters are called from worker threads.
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


class PlainReporter:
    """One line per event, for logs and pipes."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stderr
        self.lock = threading.Lock()
        self.partial: dict[str, bytes] = {}

    def _print(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def step_start(self, step: Step) -> None:
        pass

    def step_log(self, step: Step, data: bytes) -> None:
        buf = self.partial.get(step.id, b"") + data
        *lines, rest = buf.split(b"\n")
        self.partial[step.id] = rest
        for line in lines:
            self._print(f"{step.name}: {line.decode(errors='replace')}")

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        if not _visible(step):
            return
        rest = self.partial.pop(step.id, b"")
        if rest:
            self._print(f"{step.name}: {rest.decode(errors='replace')}")
        if error:  # the error itself is the CLI's one line; here only which step failed
            self._print(f"{step.name} FAILED")
        elif cached:
            self._print(f"{step.name} CACHED")
        else:
            self._print(f"{step.name} DONE {seconds:.2f}s")

    def message(self, text: str) -> None:
        self._print(text)

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        """A registry blob moving (kind "pull" or "push"): one line when it is complete."""
        if done >= total:
            self._print(f"{kind} {digest[:19]} done ({total} bytes)")

    def finish(self, result: BuildResult) -> None:
        self._print(
            f"{result.steps_cached}/{result.steps_total} steps cached, {result.seconds:.2f}s"
        )
        self._print(f"image {result.manifest_digest}")
        for ref in result.pushed:
            self._print(f"pushed {ref}")


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
        self._emit(obj)

    def message(self, text: str) -> None:
        self._emit({"event": "message", "text": text})

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        """A registry blob moving: ``{"event": "pull"|"push", "digest", "done", "total"}``."""
        self._emit({"event": kind, "digest": digest, "done": done, "total": total})

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
    """A live view on a terminal: one line per running step, finished steps scroll above."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self._Text = Text
        self.console = Console(stderr=True)
        self.running: dict[str, tuple[str, float]] = {}
        self.blobs: dict[str, str] = {}  # registry blobs in flight: digest -> their line
        self.live = Live(Text(""), console=self.console, refresh_per_second=8, transient=True)
        self.live.start()

    def _render(self) -> Any:
        now = time.monotonic()
        lines = [f"=> {name} {now - t0:.1f}s" for name, t0 in self.running.values()]
        lines += self.blobs.values()
        return self._Text("\n".join(lines))

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        with self.lock:
            if done >= total:
                self.blobs.pop(digest, None)
            else:
                bar = "#" * (20 * done // max(total, 1))
                self.blobs[digest] = (
                    f"=> {kind} {digest[7:19]} [{bar:<20}] {done / 1e6:.1f}/{total / 1e6:.1f} MB"
                )
            self.live.update(self._render())
        super().transfer(kind, digest, done, total)

    def _print(self, text: str) -> None:
        with self.lock:
            self.console.print(text, markup=False, highlight=False)
            self.live.update(self._render())

    def step_start(self, step: Step) -> None:
        if _visible(step):
            with self.lock:
                self.running[step.id] = (step.name, time.monotonic())
                self.live.update(self._render())

    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None:
        with self.lock:
            self.running.pop(step.id, None)
        super().step_done(step, cached=cached, seconds=seconds, error=error)

    def close(self) -> None:
        self.live.stop()

    def finish(self, result: BuildResult) -> None:
        self.close()
        super().finish(result)


def make_reporter(mode: str) -> Reporter:
    """``auto`` picks the live view on a terminal and plain lines otherwise."""
    if mode == "json":
        return JsonReporter()
    if mode == "auto" and sys.stderr.isatty():
        return RichReporter()
    return PlainReporter()
