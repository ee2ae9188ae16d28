"""``COPY --exclude`` and ``COPY --parents`` with Dockerfile 1.7+ semantics.

BuildKit (``dockerfile2llb/convert_copy.go``, ``tonistiigi/fsutil/copy``) implements both as
pattern filters of one copy:

- ``--exclude=PATTERN`` (repeatable) filters what lies *below* each matched source, with
  .dockerignore's rules (moby/patternmatcher: a pattern matching a directory excludes what is
  under it, ``**``, and ``!PATTERN`` re-includes), matched against the path relative to the
  source.  A source itself (a wildcard's match included) is never excluded.  An excluded
  directory holding a re-included path is still created, as the parent of what is copied.
- ``--parents``: a source ``a/b/c`` copies the context root's contents filtered by the
  include pattern ``a/b/c``, so the file lands at ``DEST/a/b/c`` with its parent directories
  (copied with their own metadata).  ``/./`` marks a pivot: ``x/./y/z`` copies from ``x``
  with the pattern ``y/z``.  An include pattern matches a path or one of its parents (a
  directory brings everything under it); without wildcards, the path must exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from builder.frontend.dockerignore import (
    IgnoreRules,
    Pattern,
    PatternSyntaxError,
    go_clean,
    has_wildcards,
)
from cache.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from builder.plan.copyspec import Selected
    from cache.layers.view import View

__all__ = [
    "Keep",
    "exclude_rules",
    "include_rules",
    "keep_filter",
    "required_path",
    "select_from_view_filtered",
    "split_parents",
]

Keep = Callable[[Sequence[tuple[str, bool]]], set[str]]
"""Given (path below a source, is a directory) pairs, the paths the copy keeps."""


def _clean(raw: str) -> str:
    pattern = go_clean(raw)
    if len(pattern) > 1 and pattern.startswith("/"):
        pattern = pattern[1:]
    return pattern


def _rules(
    patterns: Iterable[str], what: str, file: str | None, line: int | None
) -> IgnoreRules:
    compiled: list[Pattern] = []
    for raw in patterns:
        text = raw.strip()
        exclusion = text.startswith("!")
        if exclusion:
            text = text[1:].strip()
        if not text:
            raise InvalidInput(f"invalid {what} pattern {raw!r}", file=file, line=line)
        try:
            compiled.append(Pattern.compile(_clean(text), exclusion=exclusion))
        except PatternSyntaxError as err:
            raise InvalidInput(
                f"invalid {what} pattern {raw!r}: {err}", file=file, line=line
            ) from None
    return IgnoreRules(tuple(compiled))


def exclude_rules(
    patterns: Sequence[str], file: str | None = None, line: int | None = None
) -> IgnoreRules | None:
    """The rules of a COPY's ``--exclude`` flags, None when there are none."""
    return _rules(patterns, "--exclude", file, line) if patterns else None


def include_rules(pattern: str, file: str | None = None, line: int | None = None) -> IgnoreRules:
    """The include rule of one ``--parents`` source pattern."""
    return _rules([pattern], "--parents", file, line)


def split_parents(source: str) -> tuple[str, str]:
    """A ``--parents`` source as (the directory copied from, the include pattern below it)."""
    parent, sep, pattern = source.partition("/./")
    if not sep:
        parent, pattern = "/", source
    pattern = go_clean("/" + pattern).lstrip("/")
    return parent or "/", pattern


def keep_filter(include: IgnoreRules | None, exclude: IgnoreRules | None) -> Keep | None:
    """A Keep for these rules (None when there are none: everything is kept)."""
    if include is None and exclude is None:
        return None

    def keep(found: Sequence[tuple[str, bool]]) -> set[str]:
        kept: set[str] = {""}
        for rel, _is_dir in found:
            if rel == "":
                continue
            if include is not None and not _included(include, rel):
                continue
            if exclude is not None and exclude.excluded(rel):
                continue
            kept.add(rel)
        # Parents of what is kept are created (with their own metadata) even when a pattern
        # left them out themselves: an include pattern a/b/c, or an excluded directory with
        # a re-included child.
        for rel in list(kept):
            parts = rel.split("/")
            for n in range(1, len(parts)):
                kept.add("/".join(parts[:n]))
        return kept

    return keep


def _included(rules: IgnoreRules, rel: str) -> bool:
    """Whether an include rule takes ``rel``: the pattern matches it or one of its parents."""
    return rules.excluded(rel)  # "excluded" reads "matched" here: the last matching pattern


def required_path(base: str, pattern: str) -> bool:
    """Whether a ``--parents`` source must exist (BuildKit: when it has no wildcard)."""
    return not has_wildcards(base) and not has_wildcards(pattern)


def select_from_view_filtered(
    view: View, sources: Sequence[str], exclude: Sequence[str], parents: bool, file: str, line: int
) -> list[Selected]:
    """``COPY --from`` sources with ``--exclude`` and ``--parents`` applied (as for the context)."""
    from dataclasses import replace

    from builder.plan.copyspec import select_from_view

    ex = exclude_rules(exclude, file, line)
    out: list[Selected] = []
    for src in sources:
        base, pattern, keep = src, "", keep_filter(None, ex)
        if parents:
            base, pattern = split_parents(src)
            keep = keep_filter(include_rules(pattern, file, line), ex)
        for sel in select_from_view(view, [base], file, line):
            if keep is not None and sel.is_dir:
                kept = keep([(it.rel, it.entry.type == "dir") for it in sel.items])
                sel = replace(sel, items=tuple(it for it in sel.items if it.rel in kept))
            if parents and sel.is_dir:
                if len(sel.items) == 1 and required_path(base, pattern):
                    raise NotFound(f"COPY source not found in stage: {src}", file=file, line=line)
                sel = replace(sel, name=".")
            out.append(sel)
    return out
