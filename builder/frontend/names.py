"""How messages name a Dockerfile (standard library only: the no-op path imports it).

``-f -`` saves stdin to a temporary file; every message, and every identity that must stay
the same from one build to the next (``why``'s sites, the no-op memo), names it ``-``.
"""

from __future__ import annotations

import os
from pathlib import Path

STDIN = "-"

_SHOWN_AS: dict[str, str] = {}


def show_as(path: str | Path, name: str) -> None:
    """Name the Dockerfile at ``path`` ``name`` in every message about it (``-f -``: the
    temporary file stdin was saved to is ``-``, as the user gave it)."""
    _SHOWN_AS[os.path.abspath(path)] = name


def shown_name(path: str | Path) -> str:
    """How messages name the Dockerfile at ``path``: as :func:`show_as` said, else its path."""
    return _SHOWN_AS.get(os.path.abspath(path), str(path))


def identity(dockerfile: Path | None, context: Path) -> str:
    """"The same Dockerfile" across builds: its resolved path; for ``-f -`` (a new temporary
    file each time) ``CONTEXT/-``."""
    if dockerfile is not None and shown_name(dockerfile) == STDIN:
        return str(context.resolve() / STDIN)
    return str((dockerfile or context / "Dockerfile").resolve())
