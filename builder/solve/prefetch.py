"""Making a RUN's snapshot chain while the steps below it are still being built.

A RUN needs its parent chain unpacked (``cache.snapshots.chain.ensure_chain``).  Made when
the RUN starts, that unpacking sits on the critical path: in a cold build of the bench's
context it was most of the RUN step (the base plus ~46 MB of COPY layers), while the COPY
steps before it had left a core idle.  So the solver tells a :class:`ChainPrefetch` each
time steps finish; for every stage whose next RUN is expected to miss, it sends the longest
finished prefix of that RUN's chain to one thread of its own, which makes it.  When the RUN
starts, ``ensure_chain`` finds those layers (per-name locks make a chain being made by the
prefetch thread wait for it, never make it twice).

Only RUN steps expected to miss (no record for their key, or ``--no-cache``) are served: a
build whose RUN steps hit unpacks nothing, as before.  A prefetch that fails is forgotten:
the RUN makes the chain itself and reports what goes wrong.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from builder.solve.events import RunContext
from cache.types import Digest

if TYPE_CHECKING:
    from builder.plan.dag import Step

__all__ = ["ChainPrefetch", "MakeChain"]

MakeChain = Callable[[RunContext, list[Digest]], None]
"""Makes the committed snapshot chain of these diff_ids (bottom first)."""


class _Lookup(Protocol):
    def lookup(self, step: Step) -> object | None: ...


class _Result(Protocol):
    @property
    def diff_id(self) -> Digest | None: ...


class Solving(RunContext, Protocol):
    """What the prefetch reads of the solver (builder/solve/solver.py's ``Solver``)."""

    @property
    def cache(self) -> _Lookup: ...
    @property
    def results(self) -> Mapping[str, _Result]: ...
    @property
    def no_cache(self) -> Callable[[Step], bool]: ...
    def base_diff_ids(self, stage: int) -> list[Digest]: ...


class ChainPrefetch:
    """Sends RUN steps' parent chains to be made as soon as more of them is built."""

    def __init__(self, solver: Solving, make: MakeChain) -> None:
        self.solver = solver
        self.make = make
        plan = solver.plan
        # stage -> positions of its RUN steps that will run (not hit)
        self.wanted: dict[int, list[int]] = {}
        for step in plan.steps.values():
            if step.kind != "run":
                continue
            if solver.no_cache(step) or solver.cache.lookup(step) is None:
                self.wanted.setdefault(step.stage, []).append(step.pos)
        self.sent: dict[tuple[int, int], int] = {}  # (stage, RUN pos) -> chain length sent
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def update(self) -> None:
        """Called by the scheduler after steps finished: send the chains that grew."""
        for stage, positions in self.wanted.items():
            pending = [p for p in positions if not self._done_at(stage, p)]
            if not pending:
                continue
            first = min(pending)
            chain = self._finished_prefix(stage, first)
            if not chain or len(chain) <= self.sent.get((stage, first), 0):
                continue
            self.sent[(stage, first)] = len(chain)
            self._send(chain)

    def _send(self, chain: list[Digest]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pool.submit(self._make, chain)

    def close(self) -> None:
        """Stop: chains not started are dropped, one being made is finished (it is made in
        a scratch directory and renamed, so stopping it halfway would only waste it)."""
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _make(self, chain: list[Digest]) -> None:
        if self._stop.is_set() or self.solver.cancel.is_set():
            return
        # Any failure is the RUN's to meet and report when it makes the chain itself.
        with contextlib.suppress(Exception):
            self.make(self.solver, chain)

    def _done_at(self, stage: int, pos: int) -> bool:
        for st in self.solver.plan.stages[stage].steps:
            if st.pos == pos and st.kind == "run":
                return st.id in self.solver.results
        return True

    def _finished_prefix(self, stage: int, upto: int) -> list[Digest] | None:
        """diff_ids of ``stage``'s chain up to its first unfinished step before ``upto``
        (None while the stage it is built on is unfinished)."""
        solver = self.solver
        sp = solver.plan.stages[stage]
        if sp.base_stage is not None:
            base = solver.plan.stages[sp.base_stage].steps
            if any(st.id not in solver.results for st in base):
                return None
        ids = solver.base_diff_ids(stage)
        for st in sorted(sp.steps, key=lambda s: s.pos):
            if st.kind in ("base", "end"):
                continue
            if st.pos >= upto:
                break
            r = solver.results.get(st.id)
            if r is None:
                break
            if r.diff_id is not None:
                ids.append(r.diff_id)
        return ids
