"""How the build context's directories are listed: one ``scandir`` + ``lstat`` per entry, sorted.

The no-op probe and ``BuildContext`` list directories the same way, so a build after a failed
probe reuses the probe's listings (``Scans``) instead of listing the context again.  Standard
library only: the no-op path imports it.
"""

from __future__ import annotations

import os

Scans = dict[str, list[tuple[str, os.stat_result]]]
"""Directory listings taken by the probe's walk: real rel ("." for the root) -> sorted
(name, lstat) pairs, the form ``BuildContext`` lists directories in (so a build after a
failed probe does not list and stat the context a second time)."""


def list_dir(path: str) -> list[tuple[str, os.stat_result]]:
    """A directory's (name, lstat) pairs sorted by name, the one way the context is listed
    (here and by ``BuildContext``); an entry removed while listing is left out, and a
    directory that cannot be read raises ``OSError``."""
    listing: list[tuple[str, os.stat_result]] = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                listing.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # removed since the listing
    listing.sort(key=lambda e: e[0])
    return listing
