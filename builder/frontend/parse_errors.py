"""Where in a Dockerfile the BuildKit parser failed: its messages carry no line number.

Split out of :mod:`builder.frontend.parse` (which stays under the size limit); imports only
the standard library.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def locate_parse_error(parse_string: Callable[[str], Any], text: str, message: str) -> int | None:
    """Find the line of a BuildKit parser error (its message carries no line number).

    The parser stops at the first error, so the smallest prefix of the file that fails with
    the same message ends on the failing line; binary search finds it.
    """
    lines = text.splitlines(keepends=True)

    def fails(n: int) -> bool:
        try:
            parse_string("".join(lines[:n]))
        except ValueError as err:
            return str(err) == message
        return False

    if not lines or not fails(len(lines)):
        return None
    lo, hi = 1, len(lines)
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def start_of_instruction(lines: Sequence[str], line: int, escape: str) -> int:
    """Walk back from line over continuation lines to where the instruction starts."""
    start = line
    prev = line - 1
    while prev >= 1:
        text = lines[prev - 1].strip()
        if not text or text.startswith("#"):
            prev -= 1
            continue
        if text.endswith(escape):
            start = prev
            prev -= 1
            continue
        break
    return start


def first_rejected_line(buildkit: Any, lines: Sequence[str], escape: str) -> int | None:
    """The instruction (its first line) where the parser starts rejecting the text."""
    for n in range(1, len(lines) + 1):
        try:
            buildkit.parse_string("\n".join(lines[:n]) + "\n")
        except UnicodeDecodeError:
            return start_of_instruction(lines, n, escape)
        except buildkit.GoParseError as err:
            if str(err) != "file with no instructions":
                return start_of_instruction(lines, n, escape)
    return None
