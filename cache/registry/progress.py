"""Blob progress for views: ``transfer(kind, digest, done, total)``, thinned out.

A view (a terminal bar per blob, JSON lines) needs the first and the last report of every
blob and at most one in between per quarter second, not one per network read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Transfer = Callable[[str, str, int, int], None]
"""``transfer(kind, digest, done, total)``: kind is "pull" or "push"."""
Progress = Callable[[str, int, int], None]
"""``progress(digest, done, total)``, as cache.registry.pull and push report it."""
INTERVAL_S = 0.25


def throttled(transfer: Transfer | None, kind: str) -> Progress | None:
    """A ``progress`` callback that reports to ``transfer`` as ``kind``, thinned out."""
    if transfer is None:
        return None
    last: dict[str, float] = {}
    lock = threading.Lock()

    def progress(digest: str, done: int, total: int) -> None:
        now = time.monotonic()
        with lock:
            prev = last.get(digest)
            if prev is not None and done < total and now - prev < INTERVAL_S:
                return
            last[digest] = now
        transfer(kind, digest, done, total)

    return progress
