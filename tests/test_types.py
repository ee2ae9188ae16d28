"""``cache.types.direct_init``: the faster ``__init__`` of the hot frozen dataclasses builds
the same objects the generated one does."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.plan.context import ContextFile
from builder.plan.copyspec import Item
from cache.index.values import StatEntry
from cache.types import Entry, direct_init

DECORATED = [Entry, StatEntry, ContextFile, Item]


def reference(cls: type) -> Any:
    """The same fields as ``cls`` in a frozen dataclass with the generated ``__init__``."""
    specs = [
        (f.name, f.type, dataclasses.field(default=f.default, compare=f.compare, hash=f.hash))
        for f in dataclasses.fields(cls)
    ]
    return dataclasses.make_dataclass("Ref" + cls.__name__, specs, frozen=True)


values = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.tuples(st.integers()))


@pytest.mark.parametrize("cls", DECORATED, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_direct_init_makes_what_the_generated_init_makes(cls: type, data: st.DataObject) -> None:
    ref = reference(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING
        if required or data.draw(st.booleans()):
            kwargs[f.name] = data.draw(values)
    a, b = cls(**kwargs), ref(**kwargs)
    assert vars(a) == vars(b)
    positional = [vars(b)[f.name] for f in dataclasses.fields(cls)]
    assert vars(cls(*positional)) == vars(b)
    assert a == cls(**kwargs) and hash(a) == hash(cls(**kwargs))
    assert dataclasses.replace(a) == a
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(a, name, 1)
    with pytest.raises(TypeError):
        cls(**kwargs, not_a_field=1)


def test_direct_init_refuses_what_it_cannot_make() -> None:
    @dataclasses.dataclass
    class Mutable:
        x: int

    @dataclasses.dataclass(frozen=True)
    class Factory:
        x: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True)
    class Post:
        x: int

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted:
        x: int

    for cls in (Mutable, Factory, Post, Slotted):
        with pytest.raises(TypeError):
            direct_init(cls)
