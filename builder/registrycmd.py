"""``lbuild pull REF`` and ``lbuild push NAME REF``: registry commands over builder.pull and
builder.export.registry.

``pull`` always asks the registry (one manifest HEAD when the tag is already known; blobs
in the store are never fetched again), like ``docker pull``; it prints the reference and
the manifest digest for this host's platform.  ``push`` sends an image of the local store
(a ``-t`` tag of a build, or a pulled reference) and prints ``REF@DIGEST``.  Blob progress:
one line per finished blob on stderr, or JSON events with ``--progress json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("pull", help="fetch an image from a registry into the local store")
    p.add_argument("ref", metavar="REF", help="any reference docker pull takes")
    p.add_argument("--platform", help="os/arch[/variant] (default: this machine's)")
    p.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    p.add_argument("--progress", choices=["auto", "plain", "json"], default="auto")
    q = sub.add_parser("push", help="push an image of the local store to a registry")
    q.add_argument("name", metavar="NAME[:TAG]", help="a local tag (or a pulled reference)")
    q.add_argument("ref", metavar="REF", nargs="?", help="where to push (default: NAME)")
    q.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    q.add_argument("--progress", choices=["auto", "plain", "json"], default="auto")


class TransferView:
    """Blob progress: a line per finished blob (plain) or JSON events (json)."""

    def __init__(self, mode: str, out: IO[str] | None = None) -> None:
        self.json = mode == "json"
        self.out = out or (sys.stdout if self.json else sys.stderr)
        self.lock = threading.Lock()

    def emit(self, obj: dict[str, Any]) -> None:
        obj.setdefault("time", round(time.time(), 3))
        with self.lock:
            self.out.write(json.dumps(obj, sort_keys=True) + "\n")
            self.out.flush()

    def transfer(self, kind: str, digest: str, done: int, total: int) -> None:
        if self.json:
            self.emit({"event": kind, "digest": digest, "done": done, "total": total})
        elif done >= total:
            with self.lock:
                self.out.write(f"{kind} {digest[:19]} done ({total} bytes)\n")
                self.out.flush()


def cmd_pull(ns: argparse.Namespace) -> int:
    from builder.pull import pull_into
    from cache.registry.pull import parse_platform, remote_digest
    from cache.registry.reference import parse
    from cache.session import Session

    ref = parse(ns.ref)
    platform = parse_platform(ns.platform) if ns.platform else None
    view = TransferView(ns.progress)
    with Session.open(ns.home) as session:
        rec = session.index.get_tag(str(ref)) if ref.digest is None else None
        known = None
        if rec is not None and platform is None:
            known = json.loads(rec.meta_json or "{}").get("index") or rec.manifest_digest
        if known is not None and remote_digest(ref) == known:
            # the tag did not move: only blobs missing from the store (pruned) are fetched
            pulled = pull_into(session, ref.with_digest(known), transfer=view.transfer)
        else:
            pulled = pull_into(session, ref, transfer=view.transfer, platform=platform)
        digest = pulled.manifest_digest
        status = f"{len(pulled.fetched)} blobs fetched" if pulled.fetched else "up to date"
    if view.json:
        view.emit({"event": "pulled", "ref": str(ref), "digest": digest, "status": status})
    else:
        print(f"{ref} {digest} ({status})")
    return 0


def cmd_push(ns: argparse.Namespace) -> int:
    from builder.export.registry import push_image
    from builder.options import full_tag
    from cache.errors import InvalidInput, NotFound
    from cache.registry.reference import parse
    from cache.session import Session

    target = ns.ref or ns.name
    parse(target)  # a bad reference is exit 2 before the store is opened
    view = TransferView(ns.progress)
    with Session.open(ns.home) as session:
        rec = None
        for name in _local_names(ns.name, full_tag, parse, InvalidInput):
            rec = session.index.get_tag(name)
            if rec is not None:
                break
        if rec is None:
            raise NotFound(f"push: no image {ns.name!r} in the local store")
        pushed = push_image(session, rec.manifest_digest, [target], transfer=view.transfer)
    for line in pushed:
        if view.json:
            view.emit({"event": "pushed", "ref": line.rsplit("@", 1)[0],
                       "digest": line.rsplit("@", 1)[1]})
        else:
            print(line)
    return 0


def _local_names(name: str, full_tag: Any, parse: Any, invalid: type[Exception]) -> list[str]:
    """The local tag names ``name`` may be stored under: as built (-t), as pulled."""
    names: list[str] = []
    for fn in (full_tag, lambda n: str(parse(n))):
        try:
            names.append(fn(name))
        except invalid:
            continue
    return names
