"""A RUN's parent chain is sent to be unpacked while the steps below it are still being
built (builder/solve/prefetch.py), and only for a RUN that will run.

The build is the real one, in process; the test watches what the prefetch sends (its
``_send``) and what the RUN step needs (the parent chain its ``RunSteps.__call__`` sees),
and lets both do their work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import run_fixtures
from run_fixtures import BUSYBOX, needs_root

from builder import api
from builder.solve.prefetch import ChainPrefetch
from builder.solve.run import RunSteps
from cache.types import Digest

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome

pytestmark = [needs_root]

DOCKERFILE = f"""\
FROM {BUSYBOX}
COPY a /a
COPY --link b /b
COPY c /c
RUN cat /a /b /c > /abc
"""


def _watch(monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[Digest]], list[list[Digest]]]:
    sent: list[list[Digest]] = []
    parents: list[list[Digest]] = []
    send, call = ChainPrefetch._send, RunSteps.__call__

    def watch_send(self: ChainPrefetch, chain: list[Digest]) -> None:
        sent.append(list(chain))
        send(self, chain)

    def watch_call(self: RunSteps, solver: Any, step: Any) -> Any:
        parents.append(solver.stage_diff_ids(step.stage, step.pos))
        return call(self, solver, step)

    monkeypatch.setattr(ChainPrefetch, "_send", watch_send)
    monkeypatch.setattr(RunSteps, "__call__", watch_call)
    return sent, parents


def _context(tmp_path: Path, size: int) -> Path:
    """A context with files a, b and c of ``size`` bytes each."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in "abc":
        (ctx / name).write_text(name * size)
    return ctx


def _build(ctx: Path, home: Path, dockerfile: str, *, no_cache: bool = False) -> api.BuildResult:
    (ctx / "Dockerfile").write_text(dockerfile)
    opts = api.BuildOptions(context=ctx, home=home, tags=("prefetch:test",), no_cache=no_cache)
    return api.build(opts, memo=False, writer="inline")


def test_a_run_that_will_run_has_its_chain_sent_as_it_grows(
    bbhome: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(tmp_path, 1000)
    sent, parents = _watch(monkeypatch)
    _build(ctx, bbhome, DOCKERFILE)
    assert len(parents) == 1
    parent = parents[0]
    n_base = len(parent) - 3  # busybox:test's layers, then the three COPY layers
    assert n_base >= 1
    # every chain sent is a prefix of the RUN's parent chain, each longer than the last,
    # the first one at least the base (sent before any step ran), the last the whole chain
    assert sent, "nothing was sent ahead of the RUN"
    assert all(parent[: len(c)] == c for c in sent), (sent, parent)
    assert [len(c) for c in sent] == sorted({len(c) for c in sent})
    assert len(sent[0]) >= n_base
    assert sent[-1] == parent


def test_a_run_that_hits_unpacks_nothing_ahead(
    bbhome: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(tmp_path, 1)
    _build(ctx, bbhome, DOCKERFILE)
    sent, parents = _watch(monkeypatch)
    # the same steps (every one a hit) and a label after them: the solver runs, the RUN hits
    _build(ctx, bbhome, DOCKERFILE + "LABEL after=1\n")
    assert parents == []
    assert sent == []


def test_no_cache_sends_the_chain(
    bbhome: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(tmp_path, 1)
    _build(ctx, bbhome, DOCKERFILE)
    sent, parents = _watch(monkeypatch)
    _build(ctx, bbhome, DOCKERFILE, no_cache=True)
    assert len(parents) == 1
    assert sent and sent[-1] == parents[0]


def test_the_helper_started_with_the_chain_runs_the_command_and_a_spare_one_exits(
    bbhome: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from builder.solve import executor

    started: list[executor.Helper] = []
    given: list[executor.Helper | None] = []
    init, run = executor.Helper.__init__, executor.run

    def watch_init(self: executor.Helper, *, stdin: bool) -> None:
        init(self, stdin=stdin)
        started.append(self)

    def watch_run(*a: Any, helper: executor.Helper | None = None, **k: Any) -> int:
        given.append(helper)
        return run(*a, helper=helper, **k)

    monkeypatch.setattr(executor.Helper, "__init__", watch_init)
    monkeypatch.setattr(executor, "run", watch_run)
    ctx = _context(tmp_path, 1000)
    _build(ctx, bbhome, DOCKERFILE)
    # one helper (started with the chain sent ahead, or by the RUN when it came first; never
    # one more for a chain sent while the RUN runs) ran the RUN
    assert len(started) == 1 and given == started
    # a RUN fed on stdin (a heredoc) cannot use one started ahead: that one is stopped after
    # the solve, so no helper process outlives the build
    started.clear()
    given.clear()
    heredoc = DOCKERFILE.replace(  # a script with its interpreter line: fed on stdin
        "RUN cat /a /b /c > /abc", "RUN <<EOF\n#!/bin/sh\ncat /a > /abc\nEOF"
    )
    _build(ctx, bbhome, heredoc)
    assert len(given) == 1 and given[0] is not None and given[0].stdin
    assert given == [h for h in started if h.stdin] and len(started) <= 2
    assert all(h.proc is None for h in started)  # taken by the run, or discarded
