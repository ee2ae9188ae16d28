"""RUN layers of a rootless build hold the ids a root build would (issue 9 item 5).

Without root, RUN runs in a user namespace: container root is the caller's uid (and gid), and
container ids 1..N are the caller's subordinate ids when /etc/subuid and /etc/subgid give some
(``builder.solve.executor``).  The files RUN leaves behind are owned by those *host* ids; the
layer must carry the container's ids instead, as a root build's would:

- the caller's id is 0; a subordinate id ``s + k`` is ``1 + k``; an id that maps to nothing
  (the kernel shows it as the overflow id inside) makes the step fail with a hint;
- a path that existed below and whose host owner is the caller keeps the owner the image
  gave it: the rootless unpack could not chown it (every lower file shows as root inside), so
  its owner was never something RUN chose.  (The one case this gets wrong: a RUN that chowns
  such a file to root explicitly; a root build would record root.)

Standard library only (with cache.errors), like the executor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from cache.errors import StepFailed
from cache.types import Entry

__all__ = ["IdMap", "current_map", "failure_hint", "map_entries"]


@dataclass(frozen=True)
class IdMap:
    """Host ids -> container ids of the RUN user namespace (one kind: uids or gids)."""

    caller: int
    sub_start: int = 0
    sub_count: int = 0

    def to_container(self, host: int) -> int | None:
        if host == self.caller:
            return 0
        if self.sub_count and self.sub_start <= host < self.sub_start + self.sub_count:
            return 1 + host - self.sub_start
        return None


def current_map() -> tuple[IdMap, IdMap] | None:
    """(uid map, gid map) of this process's RUN namespace; None when running as root."""
    if os.geteuid() == 0:
        return None
    from builder.solve.executor import _id_mapping

    idmap = _id_mapping()
    if idmap.single:
        return IdMap(os.getuid()), IdMap(os.getgid())
    u, g = idmap.uid_args, idmap.gid_args  # ("0", caller, "1", "1", start, count)
    return (
        IdMap(int(u[1]), int(u[4]), int(u[5])),
        IdMap(int(g[1]), int(g[4]), int(g[5])),
    )


def map_entries(
    entries: Iterable[Entry],
    uids: IdMap,
    gids: IdMap,
    below: Callable[[str], Entry | None],
    *,
    file: str | None = None,
    line: int | None = None,
) -> list[Entry]:
    """The entries of a rootless RUN's diff with container ids (see the module's rules).

    ``below`` gives the parent image's entry for a path (None when it had none).
    """
    out: list[Entry] = []
    for e in entries:
        if e.type in ("whiteout", "opaque"):
            out.append(e)
            continue
        uid, gid = uids.to_container(e.uid), gids.to_container(e.gid)
        if uid is None or gid is None:
            raise StepFailed(
                f"RUN left /{e.path} owned by host ids {e.uid}:{e.gid}, which the build's "
                "user namespace does not map",
                hint="run lbuild as root, or give this user subordinate ids in /etc/subuid "
                "and /etc/subgid",
                file=file,
                line=line,
            )
        old = below(e.path)
        if old is not None:
            if e.uid == uids.caller:
                uid = old.uid
            if e.gid == gids.caller:
                gid = old.gid
        out.append(replace(e, uid=uid, gid=gid))
    return out


def failure_hint() -> str | None:
    """Why a failed RUN may have failed when the build is rootless with one id mapped."""
    maps = current_map()
    if maps is None or maps[0].sub_count:
        return None
    return (
        "this build runs without root and without subordinate ids: inside RUN only uid/gid 0 "
        "exist, so chown/chgrp to any other id fails with 'Invalid argument'; run lbuild as "
        "root, or give this user subordinate ids in /etc/subuid and /etc/subgid (newuidmap)"
    )
