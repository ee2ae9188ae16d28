"""The solver's finisher threads (layer compression) run below the steps: nice +10 for
that thread alone, the build's other threads keep their priority."""

from __future__ import annotations

import os
import threading


def test_a_finisher_thread_lowers_only_its_own_priority() -> None:
    from builder.solve.solver import _in_background

    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def finisher() -> None:
        _in_background()
        seen["finisher"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=finisher)
    t.start()
    t.join()
    assert seen["finisher"] == min(before + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
