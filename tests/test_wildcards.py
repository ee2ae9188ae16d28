"""One wildcard matcher, Go's filepath.Match, for context and ``--from`` sources (issue 9 item 4)."""

from __future__ import annotations

import pytest

from builder.plan.copyspec import glob_view, has_wildcard
from cache.errors import InvalidInput
from cache.layers.view import View
from cache.types import Digest, Entry

LAYER = Digest("sha256:" + "1" * 64)


def _view(*files: str) -> View:
    v = View()
    v.apply([Entry(path="o", type="dir", mode=0o755)] + [Entry(path=f, type="file", mode=0o644) for f in files], LAYER)
    return v


def test_negated_class_is_go_semantics() -> None:
    v = _view("o/xray", "o/yak", "o/a*b", "o/[x]")
    # fnmatch read "[^x]" as "^ or x": it copied xray.  Go's "^" negates.
    assert glob_view(v, "/o/[^x]*") == ["o/[x]", "o/a*b", "o/yak"]
    assert not has_wildcard("o/a\\*b")  # an escape alone: a literal path, never globbed
    assert glob_view(v, "o/*\\*b") == ["o/a*b"]  # an escaped star is a literal star
    assert glob_view(v, "o/\\[x]*") == ["o/[x]"]


def test_escaped_literal_segment_after_a_wildcard() -> None:
    v = View()
    v.apply([Entry(path="d1", type="dir", mode=0o755), Entry(path="d1/a*b", type="file", mode=0o644)], LAYER)
    assert glob_view(v, "d*/a\\*b") == ["d1/a*b"]


def test_malformed_pattern_is_an_error_not_a_literal() -> None:
    with pytest.raises(InvalidInput, match=r"Dockerfile:4: bad COPY source pattern 'o/\[x'"):
        glob_view(_view("o/x"), "o/[x", "Dockerfile", 4)


def test_has_wildcard_follows_escapes() -> None:
    assert has_wildcard("a*") and has_wildcard("a\\\\*")
    assert not has_wildcard("a\\*") and not has_wildcard("plain")
