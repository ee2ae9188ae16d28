"""``lbuild cache ls|du|prune|verify`` and ``lbuild images|tag|rmi``: parse nothing, print
what :mod:`builder.manage` and :mod:`builder.commands` return (text, or ``--format json``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import TYPE_CHECKING, Any

from builder import manage

if TYPE_CHECKING:
    from cache.session import Session


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _ls(session: Session, ns: argparse.Namespace) -> None:
    rows = manage.cache_ls(session)
    if ns.format == "json":
        _json(rows)
        return
    for r in rows:
        where = f"{r['dockerfile']}:{r['line']}" if r["line"] else (r["dockerfile"] or "-")
        print(
            f"{r['key'][:16]} {r['op']:<11} {manage.human(r['size']):>10} "
            f"hits={r['hits']:<4} last_used={_when(r['last_used'])}  {where}  "
            f"{r['instruction']}"
        )


def _du(session: Session, ns: argparse.Namespace) -> None:
    du = manage.cache_du(session)
    if ns.format == "json":
        _json(du)
        return
    for kind, v in du["kinds"].items():
        print(
            f"{kind:<13} {manage.human(v['bytes']):>10} {v['bytes']:>14} bytes {v['files']:>8} files"
        )
    print(f"{'total':<13} {manage.human(du['total']):>10} {du['total']:>14} bytes")
    print(
        f"{du['blobs']} blobs; {du['records']} step records; {du['layer_records']} layer "
        f"records; {du['tags']} tags; {du['snapshots']} snapshots; "
        f"{du['cache_mounts']} cache mounts"
    )


def _prune(session: Session, ns: argparse.Namespace) -> None:
    from builder.commands import parse_duration, parse_size

    report = manage.cache_prune(
        session,
        keep_bytes=parse_size(ns.keep_bytes) if ns.keep_bytes else None,
        keep_duration=parse_duration(ns.keep_duration) if ns.keep_duration else None,
        dry_run=ns.dry_run,
    )
    for line in report.lines:
        print(("would remove " if ns.dry_run else "removed ") + line)
    for note in report.notes:
        print(note)
    print(f"{'would free' if ns.dry_run else 'freed'} {manage.human(report.freed)}")


def _verify(session: Session, ns: argparse.Namespace) -> None:
    from builder.commands import cache_verify

    findings = [*getattr(ns, "repaired", []), *cache_verify(session)]
    for f in findings:
        print(f)
    print("cache verified: " + (f"{len(findings)} problems fixed" if findings else "no corruption"))


def _images(session: Session, ns: argparse.Namespace) -> None:
    images = manage.images(session)
    if ns.format == "json":
        _json(images)
        return
    print(f"{'NAME':<40} {'DIGEST':<19} {'CREATED':<20} SIZE")
    for i in images:
        print(
            f"{i['name']:<40} {i['digest'][:19]:<19} {i['created'][:19]:<20} "
            f"{manage.human(i['size'])}"
        )


def _tag(session: Session, ns: argparse.Namespace) -> None:
    manage.tag(session, ns.src, ns.dst)


def _rmi(session: Session, ns: argparse.Namespace) -> None:
    for name in ns.names:
        print(f"Untagged: {manage.rmi(session, name)}")


_COMMANDS = {
    "ls": _ls,
    "du": _du,
    "prune": _prune,
    "verify": _verify,
    "images": _images,
    "tag": _tag,
    "rmi": _rmi,
}


def cmd_manage(ns: argparse.Namespace) -> int:
    """``cache SUBCOMMAND``, ``images``, ``tag``, ``rmi``."""
    from cache.session import Session

    cmd = ns.cache_command if ns.command == "cache" else ns.command
    exclusive = cmd in ("prune", "verify")  # no build runs while blobs and records go
    if cmd == "verify":  # the index first: a damaged one cannot even be opened
        from cache.index.repair import verify_index

        ns.repaired = verify_index(ns.home, repair_it=ns.repair)
    with Session.open(ns.home, exclusive=exclusive) as session:
        _COMMANDS[cmd](session, ns)
    return 0
