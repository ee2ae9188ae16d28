"""The solver's narrow contracts (Protocols): the step events it reports while it runs, and
the context a RUN step gets from it.

The progress views on top (:mod:`builder.progress`) implement ``StepEvents``, together with
the end of a build.  A RUN step (:mod:`builder.solve.run`) sees the solver only as a
``RunContext``: the plan, the content store, the merged view and layers below a step, the
layer writer, the events and the cancel flag.  Calls come from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from builder.plan.dag import Plan, Step
    from cache.layers.view import View
    from cache.store.blobs import BlobStore
    from cache.types import Digest, Entry, LayerInfo


class StepEvents(Protocol):
    """Step events: a start, output lines, one last event saying whether it was cached."""

    def step_start(self, step: Step) -> None: ...
    def step_log(self, step: Step, data: bytes) -> None: ...
    def step_done(
        self, step: Step, *, cached: bool, seconds: float, error: str | None = None
    ) -> None: ...
    def message(self, text: str) -> None: ...


class RunContext(Protocol):
    """What a RUN step may use of the solver that runs it."""

    plan: Plan
    store: BlobStore
    reporter: StepEvents
    cancel: threading.Event

    def view(self, stage: int, upto: int | None) -> View: ...
    def chain_view(self, diff_ids: Sequence[Digest]) -> View: ...
    def read_file(self, view: View) -> Callable[[str], bytes | None]: ...
    def stage_diff_ids(self, stage: int, upto: int | None) -> list[Digest]: ...
    def toc(self, diff_id: Digest) -> tuple[Entry, ...]: ...
    def write(self, entries: list[Entry], *, by_content: bool = False) -> LayerInfo: ...
