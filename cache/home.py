"""Where the cache home is, and the index writer a build starts before anything else.

This module is imported first by ``lbuild build`` and must stay light: it imports the
standard library and :mod:`cache.index.recorder` only (not :mod:`builder.api`), so the writer child
starts as early as possible (see :mod:`cache.index.buildindex`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.index.recorder import Recorder


def home_dir(home: Path | None) -> Path:
    """The cache directory: ``--home``, else ``cache.index.db.default_home()`` (``$LBUILD_HOME``,
    ``$XDG_CACHE_HOME/lbuild``, ``~/.cache/lbuild``)."""
    from cache.index.db import default_home

    return home if home is not None else default_home()


def start_writer(home: Path | None) -> Recorder | None:
    """Start the index writer child for a build in ``home`` ahead of everything else; None
    where a build writes inline (SQLAlchemy already imported: nothing to overlap).  Hand it
    to ``build(recorder=...)``, or ``abandon()`` it when no build follows."""
    if "sqlalchemy" in sys.modules:
        return None
    from cache.index.recorder import Recorder

    h = home_dir(home)
    h.mkdir(parents=True, exist_ok=True)
    return Recorder.start(h / "lbuild.db", lock=h / "lock")
