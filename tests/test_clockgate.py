"""repro-check's clock gate (builder/solve/clockgate.py) with an injected clock: a later build's
RUN step waits until the earlier build's same step is >= GAP s old, or that build is over."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from builder.solve.clockgate import ClockGate, from_env, gate_value, mark_done
from cache.errors import Interrupted


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def gates(root: Path, n: int, gap: float = 2.0) -> list[ClockGate]:
    out = []
    for i in range(n):
        gate = from_env({"LBUILD_REPRO_CLOCK_GATE": gate_value(root, i, gap)})
        assert gate is not None and gate.index == i and gate.gap == gap
        out.append(gate)
    return out


def test_later_build_waits_for_the_same_step_plus_the_gap(tmp_path: Path) -> None:
    g0, g1, g2 = gates(tmp_path / "gate", 3)
    clock = FakeClock(1000.0)
    assert g0.pass_step(1, 2, clock, clock.sleep) == 1000.0  # build 0 never waits
    assert clock.slept == []
    clock.now = 1000.5  # build 1 reaches the step half a second later: waits 1.5 s
    assert g1.pass_step(1, 2, clock, clock.sleep) == 1002.0
    assert sum(clock.slept) == pytest.approx(1.5)
    clock.now = 1010.0  # build 2 comes late: its predecessor's record is old enough
    clock.slept.clear()
    assert g2.pass_step(1, 2, clock, clock.sleep) == 1010.0 and clock.slept == []
    assert float((tmp_path / "gate" / "1" / "1.2").read_text()) == 1002.0


def test_a_step_the_earlier_build_never_ran_waits_for_its_end_only(tmp_path: Path) -> None:
    g0, g1 = gates(tmp_path / "gate", 2)
    clock = FakeClock(50.0)

    def sleep(s: float) -> None:  # build 0 ends while build 1 polls
        clock.sleep(s)
        if len(clock.slept) == 3:
            mark_done(tmp_path / "gate", 0)

    assert g1.pass_step(0, 1, clock, sleep) == pytest.approx(50.0 + sum(clock.slept))
    assert len(clock.slept) == 3 and max(clock.slept) < 1
    assert not (tmp_path / "gate" / "0" / "0.1").exists()
    assert g0.index == 0


def test_cancel_ends_the_wait(tmp_path: Path) -> None:
    _, g1 = gates(tmp_path / "gate", 2)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Interrupted):
        g1.pass_step(0, 1, cancel=cancel)
    assert from_env({}) is None
