"""``lbuild repro-check``'s clock gate: RUN steps of build N start >= GAP s after build N-1's.

repro-check starts its builds together and gives each one ``LBUILD_REPRO_CLOCK_GATE`` =
``INDEX:GAP:DIR`` (an internal variable, not a user option).  Just before a RUN step starts its
sandbox, build INDEX

1. (INDEX > 0) waits until build INDEX-1 has recorded the same step (matched by stage and
   position, which every variation keeps) and the wall clock reads at least GAP seconds past
   that record, or until build INDEX-1 is over without having run the step
   (``DIR/INDEX-1/done``, written by repro-check when that build exits);
2. records the wall clock in ``DIR/INDEX/STAGE.POS``.

So every RUN step's command in build N sees a wall clock >= GAP s later than the same step's
in build N-1 saw when its sandbox started, while everything else (COPY, other stages, the
export) runs without waiting.  lbuild's own times (``created``, history, COPY mtimes) never
read the clock (they are SOURCE_DATE_EPOCH, else 0), so RUN is the one place to gate.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache.errors import Interrupted, StepFailed

__all__ = ["ENV", "ClockGate", "from_env", "gate_value", "mark_done"]

ENV = "LBUILD_REPRO_CLOCK_GATE"
DONE = "done"
_POLL_S = 0.02


def gate_value(root: Path, index: int, gap: float) -> str:
    """The variable's value for build ``index`` (its record directory is made here)."""
    (root / str(index)).mkdir(parents=True, exist_ok=True)
    return f"{index}:{gap:g}:{root}"


def mark_done(root: Path, index: int) -> None:
    """Build ``index`` is over: builds waiting for one of its steps go on."""
    _write(root / str(index) / DONE, time.time())


@dataclass(frozen=True)
class ClockGate:
    root: Path
    index: int
    gap: float

    def pass_step(
        self,
        stage: int,
        pos: int,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] = time.sleep,
        cancel: threading.Event | None = None,
    ) -> float:
        """Wait for this step's turn (see the module), record it, return the time recorded.
        ``cancel`` (the build's) ends the wait with ``Interrupted``."""
        name = f"{stage}.{pos}"
        if cancel is not None:
            sleep = cancel.wait
        if self.index > 0:
            before = self.root / str(self.index - 1)
            while True:
                when = _read(before / name)
                if when is not None:
                    while (left := when + self.gap - clock()) > 0:
                        _check(sleep(left))
                    break
                if (before / DONE).exists():
                    break
                if not self.root.is_dir():
                    raise StepFailed(f"repro-check clock gate {self.root} is gone")
                _check(sleep(_POLL_S))
        now = clock()
        _write(self.root / str(self.index) / name, now)
        return now


def from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> ClockGate | None:
    value = environ.get(ENV)
    if not value:
        return None
    index, gap, root = value.split(":", 2)
    return ClockGate(Path(root), int(index), float(gap))


def _check(cancelled: object) -> None:
    if cancelled is True:  # Event.wait: the build was cancelled
        raise Interrupted("RUN interrupted")


def _read(path: Path) -> float | None:
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, when: float) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(repr(when))
    os.replace(tmp, path)
