""".dockerignore rules with Docker's semantics (moby/patternmatcher), not gitignore's.

Vocabulary: a *pattern* is one cleaned, non-comment line of the ignore file; an *exclusion*
is a pattern written with a leading ``!`` (it re-includes what earlier patterns excluded).
A pattern *matches* a context-relative path when it matches the path itself or any of its
parent directories, so a pattern naming a directory excludes everything under it.  The last
pattern that matches a path decides whether the path is excluded.

Patterns are anchored at the context root (a leading ``/`` is dropped, never "at any
depth" as in .gitignore).  Inside a pattern ``*`` matches within one path segment, ``?``
one character, ``[...]`` a class (``[^...]`` negated), ``\\`` escapes the next character
and ``**`` any number of segments.  The module also holds the Go ``filepath.Match``
segment matcher that COPY wildcards use (:func:`compile_segment`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cache.errors import InvalidInput

MatchKind = Literal["exact", "prefix", "suffix", "regex"]
"""How a pattern is compared to a path: whole string, startswith, endswith or a regex.

The kinds mirror moby/patternmatcher so that its corner cases (``foo**`` matches
``foobar``, ``**foo`` matches ``xfoo``) give the same answers here."""

_UTF8_BOM = "\ufeff"


class PatternSyntaxError(ValueError):
    """A glob pattern is malformed (an unclosed ``[``, an empty class, a trailing ``\\``)."""


def go_clean(path: str) -> str:
    """Return ``path`` cleaned like Go's ``filepath.Clean`` on a POSIX system."""
    cleaned = posixpath.normpath(path)
    # posixpath keeps a leading "//" (POSIX allows it to mean something); Go does not.
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def _parse_class(text: str, start: int, *, inverted_ok: bool = True) -> tuple[str, int]:
    """Translate the ``[...]`` class starting at ``text[start]`` to a regex; return it and the index after ``]``.

    Follows Go's ``filepath.Match`` grammar: ``^`` negates, ``lo-hi`` ranges, ``\\`` escapes,
    the class must be non-empty and closed.  An inverted range (``l-O``) matches nothing
    there; ``inverted_ok=False`` rejects it as Go's ``regexp`` does, which is what
    moby/patternmatcher compiles .dockerignore classes with.
    """
    i = start + 1
    negate = i < len(text) and text[i] == "^"
    if negate:
        i += 1
    items: list[str] = []
    first = True
    while True:
        if i >= len(text):
            raise PatternSyntaxError("unclosed '[' in pattern")
        if text[i] == "]" and not first:
            i += 1
            break
        first = False
        lo, i = _class_char(text, i)
        hi = lo
        if i < len(text) and text[i] == "-":
            hi, i = _class_char(text, i + 1)
        # Go accepts an inverted range and it matches nothing; Python's re would reject it.
        if lo > hi and not inverted_ok:
            raise PatternSyntaxError(f"invalid character class range: `{lo}-{hi}`")
        if lo <= hi:
            items.append(re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}")
    body = "".join(items)
    if negate:
        return (f"[^{body}]" if body else "(?s:.)"), i
    return (f"[{body}]" if body else "(?!)"), i


def _class_char(text: str, i: int) -> tuple[str, int]:
    """Read one (possibly escaped) character of a class at ``text[i]``; return it and the next index."""
    if i >= len(text) or text[i] in "-]":
        raise PatternSyntaxError("bad character class in pattern")
    if text[i] == "\\":
        i += 1
        if i >= len(text):
            raise PatternSyntaxError("trailing '\\' in pattern")
    return text[i], i + 1


def compile_segment(segment: str) -> re.Pattern[str]:
    """Compile one path segment of a Go ``filepath.Match`` pattern (COPY wildcards).

    ``*`` matches any run of characters, ``?`` one character, ``[...]`` a class, ``\\``
    escapes the next character.  Raises :class:`PatternSyntaxError` for a malformed pattern.
    """
    out: list[str] = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "*":
            out.append(".*")
            i += 1
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[":
            cls, i = _parse_class(segment, i)
            out.append(cls)
        elif ch == "\\":
            if i + 1 >= len(segment):
                raise PatternSyntaxError("trailing '\\' in pattern")
            out.append(re.escape(segment[i + 1]))
            i += 2
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def has_wildcards(path: str) -> bool:
    """Return True when ``path`` holds an unescaped ``*``, ``?`` or ``[`` (as BuildKit decides)."""
    i = 0
    while i < len(path):
        if path[i] == "\\":
            i += 2
            continue
        if path[i] in "*?[":
            return True
        i += 1
    return False


def _compile_pattern(text: str) -> tuple[MatchKind, str, re.Pattern[str] | None]:
    """Compile a cleaned ignore pattern into (kind, literal, regex) the way patternmatcher does."""
    kind: MatchKind = "exact"
    out: list[str] = []
    i = 0
    first = True
    while i < len(text):
        ch = text[i]
        if ch == "*" and text.startswith("**", i):
            i += 2
            if i < len(text) and text[i] == "/":
                i += 1  # "**/" behaves as "**"
            if i >= len(text):
                # A trailing "**" accepts anything, "/" included.
                if kind == "exact":
                    kind = "prefix"
                else:
                    out.append(".*")
                    kind = "regex"
            else:
                out.append("(?:.*/)?")
                kind = "regex"
            if first:
                kind = "suffix"
        elif ch == "*":
            out.append("[^/]*")
            kind = "regex"
            i += 1
        elif ch == "?":
            out.append("[^/]")
            kind = "regex"
            i += 1
        elif ch == "[":
            cls, i = _parse_class(text, i, inverted_ok=False)
            out.append(cls)
            kind = "regex"
        elif ch == "\\":
            if i + 1 >= len(text):
                raise PatternSyntaxError("trailing '\\' in pattern")
            out.append(re.escape(text[i + 1]))
            kind = "regex"
            i += 2
        else:
            out.append(re.escape(ch))
            i += 1
        first = False
    if kind == "regex":
        return kind, text, re.compile("".join(out) + r"\Z", re.DOTALL)
    return kind, text, None


@dataclass(frozen=True)
class Pattern:
    """One .dockerignore pattern, cleaned and compiled.

    ``text`` is the cleaned pattern without its ``!``; ``exclusion`` is True for a ``!``
    pattern (it re-includes); ``line`` is its 1-based line in the ignore file (0 if unknown).
    """

    text: str
    exclusion: bool = False
    line: int = 0
    kind: MatchKind = field(default="exact", compare=False, repr=False)
    regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)
    segments: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # ``matches``, made once: a walk asks every pattern about every path (``_tester``)
    test: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def compile(cls, text: str, *, exclusion: bool = False, line: int = 0) -> Pattern:
        """Build a Pattern from a cleaned pattern text; PatternSyntaxError when malformed."""
        kind, literal, regex = _compile_pattern(text)
        p = cls(literal, exclusion, line, kind, regex, tuple(text.split("/")))
        object.__setattr__(p, "test", _tester(p))
        return p

    def matches(self, rel: str) -> bool:
        """Return True when this pattern matches ``rel`` itself (parents are not considered)."""
        if self.kind == "exact":
            return rel == self.text
        if self.kind == "prefix":
            return rel.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return rel.endswith(suffix) or (suffix.startswith("/") and rel == suffix[1:])
        assert self.regex is not None
        return self.regex.match(rel) is not None

    def matches_or_parent(self, rel: str) -> bool:
        """Return True when this pattern matches ``rel`` or one of its parent directories."""
        if self.matches(rel):
            return True
        parts = rel.split("/")
        return any(self.matches("/".join(parts[:n])) for n in range(1, len(parts)))

    def may_match_below(self, rel_dir: str) -> bool:
        """Return False only when this pattern cannot match ``rel_dir`` or any path below it.

        A pattern that matches ``rel_dir`` or a parent matches everything below it, so that
        counts as True.  The answer errs on True (the safe side for a walker) when unsure.
        """
        dirs = [] if rel_dir == "." else rel_dir.split("/")
        for n, part in enumerate(dirs):
            if n >= len(self.segments):
                return True  # the pattern matched a parent: it covers everything below
            seg = self.segments[n]
            if "**" in seg:
                return True
            try:
                if not compile_segment(seg).fullmatch(part):
                    return False
            except PatternSyntaxError:
                return True
        return True


_ANY_DIR_SUFFIX = re.compile(r"\*\*/\*([^*?\[\\/]+)")
"""``**/*LITERAL`` (``**/*.pyc``): a path whose last segment ends with LITERAL."""


def _tester(p: Pattern) -> Callable[[str], bool]:
    """``p.matches``, or for ``**/*LITERAL`` the suffix test its regex amounts to."""
    m = _ANY_DIR_SUFFIX.fullmatch(p.text) if p.kind == "regex" else None
    if m is None:
        return p.matches
    tail = m.group(1)  # the regex is (?:.*/)?[^/]*LITERAL, and LITERAL holds no "/"
    return lambda rel: rel.endswith(tail)


@dataclass(frozen=True)
class IgnoreRules:
    """The patterns of one .dockerignore file, in file order; decides which context paths are excluded."""

    patterns: tuple[Pattern, ...] = ()
    # made once from ``patterns`` (a walk asks about every path, twice per build)
    _tests: tuple[Callable[[str], bool], ...] = field(init=False, compare=False, repr=False)
    _has_exclusions: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_tests", tuple(p.test or p.matches for p in self.patterns))
        object.__setattr__(self, "_has_exclusions", any(p.exclusion for p in self.patterns))

    # A walker's fast path: the *match state* of a path is, per pattern, whether the pattern
    # matches the path or a parent.  A child's state follows from its parent's with one match
    # per pattern, instead of re-matching every parent at every depth.

    def state(self, rel: str) -> tuple[bool, ...]:
        """The match state of ``rel``: for each pattern, whether it matches ``rel`` or a parent."""
        return tuple(p.matches_or_parent(rel) for p in self.patterns)

    def child_state(self, parent: tuple[bool, ...], rel: str) -> tuple[bool, ...]:
        """The match state of ``rel`` given the match state of its parent directory."""
        return tuple([m or t(rel) for m, t in zip(parent, self._tests, strict=True)])

    def excluded_by(self, state: tuple[bool, ...]) -> bool:
        """Whether a path with this match state is excluded: the last matching pattern decides."""
        if not self._has_exclusions:
            return True in state
        for matched, pattern in zip(reversed(state), reversed(self.patterns), strict=True):
            if matched:
                return not pattern.exclusion
        return False

    def may_include_below_from(self, rel_dir: str, state: tuple[bool, ...]) -> bool:
        """may_include_below() for a directory whose match state is already known."""
        blocked = False  # a later plain pattern matches rel_dir or a parent: it wins below
        for matched, pattern in zip(reversed(state), reversed(self.patterns), strict=True):
            if pattern.exclusion:
                if not blocked and pattern.may_match_below(rel_dir):
                    return True
            elif matched:
                blocked = True
        return False

    def excluded(self, rel: str) -> bool:
        """Return True when the context-relative path ``rel`` ('/'-separated) is excluded.

        The context root itself (``"."`` or ``""``) is never excluded, as in Docker.
        """
        if rel in ("", ".") or not self.patterns:
            return False
        return self.excluded_by(self.state(rel))

    def may_include_below(self, rel_dir: str) -> bool:
        """Return False when no ``!`` pattern could re-include anything below ``rel_dir``.

        A walker that finds ``rel_dir`` excluded may then skip the whole directory.
        """
        if not any(p.exclusion for p in self.patterns):
            return False
        state = (False,) * len(self.patterns) if rel_dir in ("", ".") else self.state(rel_dir)
        return self.may_include_below_from(rel_dir, state)


def _clean_pattern(raw: str) -> str:
    """Clean one pattern like Docker: Go filepath.Clean, then drop a leading '/'."""
    pattern = go_clean(raw)
    if len(pattern) > 1 and pattern.startswith("/"):
        pattern = pattern[1:]
    return pattern


def parse_dockerignore(text: str, *, source: str | None = None) -> IgnoreRules:
    """Parse the text of a .dockerignore file into IgnoreRules.

    ``source`` names the file in error messages.  A malformed pattern or a lone ``!`` raises
    InvalidInput with the file and line.
    """
    patterns: list[Pattern] = []
    if text.startswith(_UTF8_BOM):
        text = text[len(_UTF8_BOM) :]
    for lineno, line in enumerate(text.splitlines(), start=1):
        # Only a '#' in the first column starts a comment, as in Docker.
        if line.startswith("#"):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        exclusion = pattern.startswith("!")
        if exclusion:
            pattern = pattern[1:].strip()
            if not pattern:
                raise InvalidInput('illegal exclusion pattern: "!"', file=source, line=lineno)
        pattern = _clean_pattern(pattern)
        try:
            patterns.append(Pattern.compile(pattern, exclusion=exclusion, line=lineno))
        except PatternSyntaxError as err:
            raise InvalidInput(
                f"bad .dockerignore pattern {pattern!r}: {err}", file=source, line=lineno
            ) from None
    return IgnoreRules(tuple(patterns))


def load_ignore(context_dir: Path, dockerfile: Path) -> tuple[IgnoreRules, Path | None]:
    """Read the ignore rules for a build; return them and the file they came from (None if none).

    ``<Dockerfile name>.dockerignore`` next to the Dockerfile wins over
    ``CONTEXT/.dockerignore``, as in BuildKit.
    """
    candidates = [dockerfile.parent / (dockerfile.name + ".dockerignore")]
    candidates.append(context_dir / ".dockerignore")
    for path in candidates:
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except IsADirectoryError:
            raise InvalidInput(f"cannot read {path}: Is a directory") from None
        except OSError as err:
            raise InvalidInput(f"cannot read {path}: {err.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInput(f"{path} is not valid UTF-8 (byte {err.start})") from None
        return parse_dockerignore(text, source=str(path)), path
    return IgnoreRules(), None
