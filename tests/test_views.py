"""cache.layers.view.Views: a build's merged views, each chain's made once from its longest
prefix already made, the same as a view made from scratch."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from cache.layers.view import View, Views
from cache.types import Digest, Entry

NAMES = ["a", "a/b", "a/b/c", "a/d", "e", "e/f"]


def _entry(path: str, kind: str) -> Entry:
    mode = 0o755 if kind == "dir" else 0o644
    return Entry(path=path, type=kind, mode=mode)  # type: ignore[arg-type]


layer_st = st.lists(
    st.tuples(st.sampled_from(NAMES), st.sampled_from(["dir", "file", "whiteout", "opaque"])),
    max_size=6,
).map(lambda rows: tuple(_entry(p, k) for p, k in rows))


def _fresh(tocs: dict[Digest, tuple[Entry, ...]], chain: Sequence[Digest]) -> View:
    v = View()
    for d in chain:
        v.apply(tocs[d], d)
    return v


@settings(max_examples=150, deadline=None)
@given(st.lists(layer_st, min_size=1, max_size=5), st.lists(st.integers(0, 5), max_size=6))
def test_views_equal_views_made_from_scratch(
    layers: list[tuple[Entry, ...]], lengths: list[int]
) -> None:
    ids = [Digest(f"sha256:{i:064x}") for i in range(len(layers))]
    tocs = dict(zip(ids, layers, strict=True))
    asked: Counter[Digest] = Counter()

    def toc(d: Digest) -> tuple[Entry, ...]:
        asked[d] += 1
        return tocs[d]

    views = Views(toc)
    for n in [*lengths, len(ids)]:
        chain = ids[: min(n, len(ids))]
        got = views.of(chain)
        want = _fresh(tocs, chain)
        assert got.entries == want.entries
        assert {k: v for k, v in got.children.items() if v} == {
            k: v for k, v in want.children.items() if v
        }
        assert views.of(chain) is got  # made once, then shared
    # prefixes asked for in growing order (a stage's steps): each layer's TOC applied once
    asked.clear()
    views = Views(toc)
    for n in sorted([*lengths, len(ids)]):
        views.of(ids[: min(n, len(ids))])
    assert asked == Counter(ids)


def test_a_view_being_made_is_waited_for_not_made_twice() -> None:
    ids = [Digest(f"sha256:{i:064x}") for i in range(3)]
    started = threading.Event()
    release = threading.Event()
    calls: Counter[Digest] = Counter()

    def toc(d: Digest) -> tuple[Entry, ...]:
        calls[d] += 1
        if d == ids[-1]:
            started.set()
            assert release.wait(10)
        return (_entry(f"f{d[-1]}", "file"),)

    views = Views(toc)
    got: list[View] = []
    first = threading.Thread(target=lambda: got.append(views.of(ids)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: got.append(views.of(ids)))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for the first thread's view
    release.set()
    first.join(10)
    second.join(10)
    assert len(got) == 2 and got[0] is got[1]
    assert calls == Counter(ids)
    # a prefix asked for later is made from scratch once, the chain's view unchanged
    assert sorted(views.of(ids[:2]).entries) == ["f0", "f1"]
    assert sorted(got[0].entries) == ["f0", "f1", "f2"]
