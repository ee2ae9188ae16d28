"""The ``lbuild`` command line: a thin layer over builder.api.

Exit codes (one table, here): 0 success; 1 the build failed (a step failed, the store is
unusable); 2 bad usage or bad input (Dockerfile errors, missing sources, bad flags);
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cache.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, LbuildError


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", metavar="CONTEXT", help="build context directory")
    p.add_argument("-f", "--file", dest="dockerfile", help="Dockerfile (default CONTEXT/Dockerfile)")
    p.add_argument("-t", "--tag", dest="tags", action="append", default=[], help="NAME[:TAG]")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    p.add_argument("--build-context", action="append", default=[],
                   metavar="NAME=oci-layout://DIR[:TAG]")
    p.add_argument("--target", help="stage to build")
    p.add_argument("--no-cache", action="store_true", help="build every step again")
    p.add_argument("--no-cache-filter", action="append", default=[], metavar="STAGE",
                   help="build these stages again")
    p.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME or ~/.cache/lbuild)")
    p.add_argument("--jobs", "-j", type=int, default=0, help="parallel steps (default: cores)")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    p.add_argument("--keep-mtime", action="store_true",
                   help="keep context file mtimes in COPY/ADD layers (they then enter the key)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lbuild", description="incremental container image builder")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image from a Dockerfile")
    _build_args(b)
    b.add_argument("-o", "--output", action="append", default=[],
                   metavar="type=oci,dest=DIR|type=docker,dest=FILE")
    b.add_argument("--progress", choices=["auto", "plain", "json"], default="auto")
    return p


def options_from(ns: argparse.Namespace) -> object:
    from builder.api import BuildOptions, parse_kv, parse_output

    return BuildOptions(
        context=Path(ns.context),
        dockerfile=Path(ns.dockerfile) if ns.dockerfile else None,
        tags=tuple(ns.tags),
        build_args=parse_kv(ns.build_arg, "--build-arg"),
        build_contexts=parse_kv(ns.build_context, "--build-context"),
        target=ns.target,
        no_cache=ns.no_cache,
        no_cache_filter=tuple(ns.no_cache_filter),
        outputs=tuple(parse_output(o) for o in getattr(ns, "output", [])),
        home=ns.home,
        jobs=ns.jobs,
        compression=ns.compression,
        keep_mtime=ns.keep_mtime,
    )


def cmd_build(ns: argparse.Namespace) -> int:
    from builder.api import BuildOptions, build
    from builder.progress import make_reporter

    opts = options_from(ns)
    assert isinstance(opts, BuildOptions)
    build(opts, make_reporter(ns.progress))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        if ns.command == "build":
            return cmd_build(ns)
    except LbuildError as e:
        print(f"lbuild: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lbuild: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
