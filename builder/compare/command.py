"""The ``diff`` and ``repro-check`` subcommands: argument parsing and printing only.

``builder.cli`` calls ``add_parsers`` (handing over its build-flag definer, so repro-check takes
exactly the flags ``lbuild build`` takes) and dispatches to ``cmd_diff`` / ``cmd_repro``.
Exit codes: 0 equal / reproducible, 1 different / not reproducible (or a build failed),
2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_EQUAL = 0
EXIT_DIFFERENT = 1

# Build flags repro-check sets itself for every build, or that make no sense there.
_NOT_FORWARDED = frozenset(
    {"context", "dockerfile", "home", "jobs", "snapshotter", "tags", "no_cache", "no_cache_filter"}
)


def add_parsers(sub: Any, build_args: Callable[[argparse.ArgumentParser], None]) -> None:
    d = sub.add_parser("diff", help="compare two images: manifest, config, layers, files")
    d.add_argument(
        "a",
        metavar="IMAGE_A",
        help="DIR[:TAG], oci-layout://DIR[:TAG], docker-archive:FILE, or a local tag",
    )
    d.add_argument("b", metavar="IMAGE_B")
    d.add_argument(
        "--ignore-timestamps",
        action="store_true",
        help="ignore config/history created times and file mtimes",
    )
    d.add_argument("--ignore-history", action="store_true", help="ignore the config's history")
    d.add_argument("--format", choices=["text", "json"], default="text")
    d.add_argument("--home", type=Path, help="cache directory for local tags")

    r = sub.add_parser(
        "repro-check", help="build N times under varied conditions and compare the images"
    )
    before = {a.dest for a in r._actions}
    build_args(r)
    r.set_defaults(_forward=[a for a in r._actions if a.dest not in before])
    r.add_argument("--runs", type=int, default=2, help="number of builds (default 2)")
    r.add_argument(
        "--variations",
        metavar="LIST",
        help="all (default), none, or a comma list such as path,umask,-clock "
        "(path umask mtime order tz locale home hostname jobs snapshotter clock)",
    )
    r.add_argument(
        "--against",
        metavar="REF",
        help="compare one build with this image instead of a second build",
    )
    r.add_argument("--format", choices=["text", "json"], default="text")
    r.add_argument("--keep", type=Path, metavar="DIR", help="keep the builds in DIR")
    r.add_argument("--ignore-timestamps", action="store_true")
    r.add_argument("--ignore-history", action="store_true")


def cmd_diff(ns: argparse.Namespace) -> int:
    from builder.compare.diff import DiffOptions, diff_images
    from builder.compare.local import LocalStore
    from builder.compare.report import diff_json, diff_text
    from builder.compare.source import open_image

    opts = DiffOptions(ns.ignore_timestamps, ns.ignore_history)
    with LocalStore(ns.home) as local:
        a = open_image(ns.a, local)
        b = open_image(ns.b, local)
        result = diff_images(a, b, opts)
    print(diff_json(result) if ns.format == "json" else diff_text(result))
    return EXIT_EQUAL if result.equal else EXIT_DIFFERENT


def forwarded_argv(ns: argparse.Namespace) -> list[str]:
    """The build flags of a repro-check command line, as ``lbuild build`` arguments."""
    out: list[str] = []
    for action in ns._forward:
        if action.dest in _NOT_FORWARDED or not action.option_strings:
            continue
        value = getattr(ns, action.dest, None)
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                out += [flag, str(item)]
        elif value is not None and value != action.default:
            out += [flag, str(value)]
    return out


def cmd_repro(ns: argparse.Namespace) -> int:
    from builder.compare.diff import DiffOptions
    from builder.compare.local import LocalStore
    from builder.compare.report import repro_json, repro_text
    from builder.compare.repro import ReproSpec, parse_variations, repro_check
    from builder.options import parse_kv

    if ns.dockerfile == "-":  # each run is a build of its own, reading the file again
        from cache.errors import Unsupported

        raise Unsupported("repro-check -f - (the Dockerfile from stdin) is not supported yet")
    contexts = parse_kv(getattr(ns, "build_context", []) or [], "--build-context", from_env=False)
    spec = ReproSpec(
        context=Path(ns.context),
        dockerfile=Path(ns.dockerfile) if ns.dockerfile else None,
        build_argv=tuple(forwarded_argv(ns)),
        runs=ns.runs,
        variations=parse_variations(ns.variations),
        against=ns.against,
        jobs=ns.jobs or 0,
        snapshotter=ns.snapshotter,
        target=getattr(ns, "target", None),
        base_contexts=contexts,
        work=ns.keep,
        options=DiffOptions(ns.ignore_timestamps, ns.ignore_history),
    )
    with LocalStore(ns.home) as local:
        report = repro_check(spec, local, local.export_base)
    if ns.format == "json":
        print(repro_json(report))
    else:
        print(repro_text(report, rich_table=sys.stdout.isatty()))
    return EXIT_EQUAL if report.reproducible else EXIT_DIFFERENT
