"""What a solve tells the outside while it runs: the step events (a Protocol).

The progress views on top (:mod:`builder.progress`) implement it, together with the end of a
build; the solver and the RUN step only see this narrow contract.  Calls come from worker
threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from builder.plan.dag import Step


class StepEvents(Protocol):
    """Step events: a start, output lines, one last event saying whether it was cached."""

    def step_start(self, step: Step) -> None: ...
    def step_log(self, step: Step, data: bytes) -> None: ...
    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None: ...
    def message(self, text: str) -> None: ...
