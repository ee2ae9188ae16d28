"""The commands that move the cache: ``lbuild warm``, ``lbuild cache export``, ``lbuild cache
import`` (argparse definitions and thin handlers over :mod:`builder.warm` and
:mod:`builder.cacheshare`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from cache.errors import InvalidInput


def add_warm_parser(sub: Any) -> None:
    w = sub.add_parser(
        "warm", help="build every stage for each build-arg combination and export the cache"
    )
    w.add_argument("context", metavar="CONTEXT", help="build context directory")
    w.add_argument(
        "-f", "--file", dest="dockerfiles", action="append", default=[],
        help="a Dockerfile (repeatable; default CONTEXT/Dockerfile)",
    )
    w.add_argument("--target", dest="targets", action="append", default=[],
                   help="a stage to build (repeatable; default: every stage)")
    w.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    w.add_argument("--build-context", action="append", default=[],
                   metavar="NAME=oci-layout://DIR[:TAG]")
    w.add_argument("--matrix", type=Path, metavar="FILE",
                   help="JSON (or YAML) list of build-arg maps: one build of each per target")
    w.add_argument("--cache-to", action="append", default=[], required=True,
                   metavar="type=local,dest=DIR|type=registry,ref=REF")
    w.add_argument("--cache-from", action="append", default=[],
                   metavar="type=local,src=DIR|type=registry,ref=REF")
    w.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    w.add_argument("--jobs", "-j", type=int, default=0)
    w.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    w.add_argument("--progress", choices=["auto", "plain", "json"], default="auto")


def add_cache_parsers(csub: Any, home: argparse.ArgumentParser) -> None:
    ex = csub.add_parser(
        "export", parents=[home], help="export the index's records and blobs as a cache artifact"
    )
    ex.add_argument("--to", required=True, metavar="type=local,dest=DIR|type=registry,ref=REF")
    ex.add_argument("--since", metavar="DURATION",
                    help="only records used within this long (e.g. 7d, 36h)")
    ex.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    im = csub.add_parser("import", parents=[home], help="import a cache artifact into the index")
    im.add_argument("--from", dest="source", required=True,
                    metavar="type=local,src=DIR|type=registry,ref=REF")


def _warn(text: str) -> None:
    print(f"lbuild: warning: {text}", file=sys.stderr)


def cmd_warm(ns: argparse.Namespace) -> int:
    from builder.cliargs import context_path
    from builder.options import BuildOptions, parse_kv
    from builder.progress import make_reporter
    from builder.warm import load_matrix, warm
    from cache.remote.spec import parse_cache_spec

    ctx = context_path(ns.context)
    dockerfiles = [Path(f) for f in ns.dockerfiles] or [ctx / "Dockerfile"]
    base = BuildOptions(
        context=ctx,
        build_args=parse_kv(ns.build_arg, "--build-arg"),
        build_contexts=parse_kv(ns.build_context, "--build-context", from_env=False),
        home=ns.home,
        jobs=ns.jobs,
        compression=ns.compression,
        cache_from=tuple(parse_cache_spec(c, to=False) for c in ns.cache_from),
    )
    cache_to = [parse_cache_spec(c, to=True) for c in ns.cache_to]
    matrix = load_matrix(ns.matrix)
    reporter = make_reporter(ns.progress)
    summary = warm(base, dockerfiles, ns.targets, matrix, cache_to, reporter)
    data = summary.to_json()
    if ns.progress == "json":
        print(json.dumps({"event": "warm", **data}, sort_keys=True))
    else:
        _print_summary(data)
    return 0 if summary.ok else 1


def _print_summary(data: dict[str, Any]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title="lbuild warm")
        for col in ("Dockerfile", "target", "build args", "built", "reused", "result"):
            t.add_column(col)
        for b in data["builds"]:
            args = ",".join(f"{k}={v}" for k, v in sorted(b["build_args"].items()))
            t.add_row(b["dockerfile"], b["target"], args, str(b["built"]), str(b["reused"]),
                      b["error"] or "ok")
        Console().print(t)
    else:
        for b in data["builds"]:
            args = ",".join(f"{k}={v}" for k, v in sorted(b["build_args"].items()))
            state = f"error: {b['error']}" if b["error"] else "ok"
            print(f"{b['dockerfile']} target={b['target']} args={args or '-'}: "
                  f"{b['built']} built, {b['reused']} reused, {state}")
    for e in data["exports"]:
        print(f"exported {e['records']} records to {e['destination']}: "
              f"{e['blobs_uploaded']} blobs uploaded ({e['bytes_uploaded']} bytes), "
              f"{e['blobs_present']} already there")
    print(f"{data['steps_built']} steps built, {data['steps_reused']} reused")


def cmd_cache_share(ns: argparse.Namespace) -> int:
    from builder.cacheshare import export_index, import_all
    from cache.remote.spec import parse_cache_spec
    from cache.session import Session

    if ns.cache_command == "export":
        spec = parse_cache_spec(ns.to, to=True)
        since = None
        if ns.since:
            from builder.commands import parse_duration

            since = time.time() - parse_duration(ns.since)
        with Session.open(ns.home) as session:
            r = export_index(session, spec, since=since, codec=ns.compression)
        print(f"exported {r.records} records to {r.destination}: {r.uploaded} blobs uploaded "
              f"({r.bytes_uploaded} bytes), {r.present} already there")
        return 0
    if ns.cache_command == "import":
        spec = parse_cache_spec(ns.source, to=False)
        with Session.open(ns.home) as session:
            n, skipped = import_all(session, spec, _warn)
        print(f"imported {n} records from {spec}" + (f", {skipped} skipped" if skipped else ""))
        return 0
    raise InvalidInput(f"unknown cache command {ns.cache_command}")
