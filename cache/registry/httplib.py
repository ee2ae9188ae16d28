"""httpx, imported without the parts lbuild never runs.

lbuild speaks HTTP through httpx's synchronous client only.  Importing httpx as it is also
imports, when they are installed, its command-line client (``httpx._main``: rich, click,
pygments) and, through httpcore, the trio event loop for async use: about 0.1 s of a build
that talks to a registry, the first build of a fresh home from a registry cache above all
(docs/performance.md).  Python treats a ``None`` in ``sys.modules`` as "cannot be imported",
and httpx and httpcore fall back exactly as when those packages are absent, so for the time of
the import those two names are ``None``; afterwards they are removed again, and anything else
in the process that imports trio gets the real package.
"""

from __future__ import annotations

import sys
from typing import Any, cast

_SKIPPED = ("trio", "httpx._main")


def _import() -> None:
    skipped = [name for name in _SKIPPED if name not in sys.modules]
    modules = cast(dict[str, Any], sys.modules)
    for name in skipped:
        modules[name] = None
    try:
        import httpcore  # noqa: F401  (httpx imports it on first use; here, without trio)
        import httpx  # noqa: F401
    finally:
        for name in skipped:
            if name in modules and modules[name] is None:
                del modules[name]


_import()

import httpx as httpx  # noqa: E402  (the one already imported above; re-exported)

__all__ = ["httpx"]
