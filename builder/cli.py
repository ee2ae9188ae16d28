"""The ``lbuild`` command line: a thin layer over builder.api.

Exit codes (one table, here): 0 success; 1 the build failed (a step failed, the store is
unusable, the system refused an operation, an internal error); 2 bad usage or bad input
(Dockerfile errors, missing sources, bad flags); 130 interrupted (SIGINT); 143 terminated
(SIGTERM, handled as SIGINT is: the build is cancelled and cleaned up).  Every error is one
line on stderr; ``LBUILD_DEBUG=1`` shows the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from cache.errors import EXIT_BAD_INPUT, EXIT_BUILD_FAILED, EXIT_INTERRUPTED, LbuildError

DEFAULT_DEBOUNCE_MS = 50
"""``lbuild watch --debounce``: quiet period before a rebuild."""
DEFAULT_EXEC_GRACE_S = 5.0
"""``lbuild watch --exec-grace``: SIGTERM to SIGKILL delay when stopping the command."""


def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("context", metavar="CONTEXT", help="build context directory")
    p.add_argument(
        "-f", "--file", dest="dockerfile", help="Dockerfile (default CONTEXT/Dockerfile)"
    )
    p.add_argument("-t", "--tag", dest="tags", action="append", default=[], help="NAME[:TAG]")
    p.add_argument("--build-arg", action="append", default=[], metavar="K=V")
    p.add_argument(
        "--build-context", action="append", default=[], metavar="NAME=oci-layout://DIR[:TAG]"
    )
    p.add_argument("--target", help="stage to build")
    p.add_argument("--no-cache", action="store_true", help="build every step again")
    p.add_argument(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="build these stages again",
    )
    p.add_argument(
        "--home", type=Path, help="cache directory (default $LBUILD_HOME or ~/.cache/lbuild)"
    )
    p.add_argument("--jobs", "-j", type=int, default=0, help="parallel steps (default: cores)")
    p.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    p.add_argument(
        "--keep-mtime",
        action="store_true",
        help="keep context file mtimes in COPY/ADD layers (they then enter the key)",
    )
    p.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="id=NAME,src=FILE",
        help="a secret for RUN --mount=type=secret (never in a layer or a key)",
    )
    p.add_argument(
        "--snapshotter",
        choices=["overlay", "copy"],
        help="how RUN gets its root filesystem (default: overlay where possible)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="ENTITLEMENT",
        help="grant an entitlement: network.host (RUN --network=host)",
    )
    p.add_argument(
        "--pull",
        action="store_true",
        help="ask the registry again for FROM images pulled before (one manifest HEAD each)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lbuild", description="incremental container image builder")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image from a Dockerfile")
    _build_args(b)
    b.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="type=oci,dest=DIR|type=docker,dest=FILE|type=registry,name=REF",
    )
    b.add_argument("--progress", choices=["auto", "plain", "json"], default="auto")
    b.add_argument("--push", action="store_true", help="push every -t tag to its registry")

    pl = sub.add_parser("plan", help="print the step DAG with keys and HIT/MISS, building nothing")
    _build_args(pl)
    pl.add_argument("--format", choices=["text", "json", "dot"], default="text")

    w = sub.add_parser("why", help="explain every cache miss against the last build of the step")
    _build_args(w)

    c = sub.add_parser("cache", help="inspect and maintain the cache")
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    csub = c.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("ls", parents=[home], help="list step records, most recently used first")
    csub.add_parser("du", parents=[home], help="disk usage of the cache")
    pr = csub.add_parser(
        "prune", parents=[home], help="remove least recently used records and unneeded blobs"
    )
    pr.add_argument("--keep-bytes", help="keep at most this much (e.g. 5GB)")
    pr.add_argument("--keep-duration", help="drop records unused for longer (e.g. 7d, 36h)")
    pr.add_argument("--dry-run", action="store_true", help="only list what would go")
    ve = csub.add_parser(
        "verify",
        parents=[home],
        help="check the index (SQLite's integrity check), re-hash every blob; drop corrupt "
        "blobs and their records",
    )
    ve.add_argument(
        "--repair",
        action="store_true",
        help="set a damaged index aside and salvage what it still holds into a new one",
    )
    # watch and unpack are defined here, not in their modules: a build must not import them
    _watch_parser(sub)
    from builder.compare.command import add_parsers as compare_parsers

    compare_parsers(sub, _build_args)  # diff, repro-check
    from builder.registrycmd import add_parsers as registry_parsers

    registry_parsers(sub)  # pull, push
    u = sub.add_parser("unpack", help="unpack an image's root filesystem into a directory")
    u.add_argument("image", metavar="IMAGE", help="a local tag, or oci-layout://DIR[:TAG]")
    u.add_argument("dest", metavar="DIR", type=Path, help="must not exist, or be empty")
    u.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    return p


def _watch_parser(sub: Any) -> None:
    """The ``watch`` subcommand: the build arguments plus the watcher's own."""
    w = sub.add_parser("watch", help="build, then rebuild on every change to the context")
    _build_args(w)
    w.add_argument(
        "-o",
        "--output",
        action="append",
        default=[],
        metavar="type=oci,dest=DIR|type=docker,dest=FILE",
        help="exported again after every successful build",
    )
    w.add_argument(
        "--progress",
        choices=["auto", "plain", "json"],
        default="auto",
        help="json: JSON lines on stdout; otherwise one summary line per rebuild",
    )
    w.add_argument(
        "--debounce",
        type=_non_negative_int,
        default=DEFAULT_DEBOUNCE_MS,
        metavar="MS",
        help=f"quiet period before a rebuild (default {DEFAULT_DEBOUNCE_MS})",
    )
    w.add_argument(
        "--exec",
        dest="exec_command",
        metavar="CMD",
        help="run CMD (sh -c) after each successful build that gives a new image; "
        "$LBUILD_IMAGE_DIGEST and $LBUILD_OUTPUT name it",
    )
    w.add_argument(
        "--exec-grace",
        type=float,
        default=DEFAULT_EXEC_GRACE_S,
        metavar="SECONDS",
        help=f"SIGTERM to SIGKILL delay when stopping CMD (default {DEFAULT_EXEC_GRACE_S:g})",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def options_from(ns: argparse.Namespace) -> object:
    from builder.options import BuildOptions, parse_allow, parse_kv, parse_output

    if ns.secret:
        from builder.solve.run import secrets_from

    return BuildOptions(
        context=Path(ns.context),
        dockerfile=Path(ns.dockerfile) if ns.dockerfile else None,
        tags=tuple(ns.tags),
        build_args=parse_kv(ns.build_arg, "--build-arg"),
        build_contexts=parse_kv(ns.build_context, "--build-context", from_env=False),
        target=ns.target,
        no_cache=ns.no_cache,
        no_cache_filter=tuple(ns.no_cache_filter),
        outputs=tuple(parse_output(o) for o in getattr(ns, "output", [])),
        home=ns.home,
        jobs=ns.jobs,
        compression=ns.compression,
        keep_mtime=ns.keep_mtime,
        secrets=secrets_from(ns.secret) if ns.secret else {},
        snapshotter=ns.snapshotter,
        allow=parse_allow(ns.allow),
        pull=getattr(ns, "pull", False),
        push=getattr(ns, "push", False),
        offline=ns.command == "watch" and not getattr(ns, "pull", False),
    )


def cmd_build(ns: argparse.Namespace) -> int:
    # The index writer starts first, before this process imports the builder: on a miss its
    # SQLAlchemy import overlaps everything this process does; on a no-op it is stopped
    # (a few ms here, the rest on the other core).
    from cache.home import start_writer

    writer = start_writer(ns.home)
    try:
        from builder.api import build
        from builder.noop import try_fast
        from builder.options import BuildOptions
        from builder.progress import make_reporter

        opts = options_from(ns)
        assert isinstance(opts, BuildOptions)
        reporter = make_reporter("plain" if ns.progress == "auto" else ns.progress)
        # --pull and pushes talk to registries: never answered from the no-op memo
        network = opts.pull or bool(opts.registry_names())
        done, probe = (None, None) if network else try_fast(opts, reporter)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if done is not None:
        if writer is not None:
            writer.abandon()
        return 0
    build(
        opts,
        make_reporter(ns.progress) if ns.progress == "auto" else reporter,
        probe,
        recorder=writer,
    )
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from builder.commands import plan_text, planned
    from builder.options import BuildOptions
    from cache.session import Session

    opts = options_from(ns)
    assert isinstance(opts, BuildOptions)
    with Session.open(opts.home) as session:
        _, steps = planned(opts, session)
    print(plan_text(steps, ns.format))
    return 0


def cmd_why(ns: argparse.Namespace) -> int:
    from builder.commands import why
    from builder.options import BuildOptions
    from cache.session import Session

    opts = options_from(ns)
    assert isinstance(opts, BuildOptions)
    with Session.open(opts.home) as session:
        for ps, reasons in why(opts, session):
            if ps.hit:
                print(f"HIT  {ps.name}")
            else:
                print(f"MISS {ps.name}")
                for r in reasons:
                    print(f"     - {r}")
    return 0


def cmd_cache(ns: argparse.Namespace) -> int:
    import datetime as dt

    from builder import commands
    from cache.session import Session

    exclusive = ns.cache_command in ("prune", "verify")
    repaired: list[str] = []
    if ns.cache_command == "verify":  # the index first: a damaged one cannot even be opened
        from cache.index.repair import verify_index

        repaired = verify_index(ns.home, repair_it=ns.repair)
    with Session.open(ns.home, exclusive=exclusive) as session:
        if ns.cache_command == "ls":
            for r in commands.cache_ls(session):
                when = dt.datetime.fromtimestamp(r["last_used"]).strftime("%Y-%m-%d %H:%M:%S")
                print(
                    f"{r['key'][:16]} {r['op']:<11} {commands.human(r['size']):>10} "
                    f"hits={r['hits']:<4} last_used={when}"
                )
        elif ns.cache_command == "du":
            du = commands.cache_du(session)
            print(
                f"{du['blobs']} blobs, {commands.human(du['bytes'])} "
                f"({du['bytes']} bytes); {du['records']} step records; "
                f"{du['layer_records']} layer records; {du['tags']} tags"
            )
        elif ns.cache_command == "prune":
            lines, freed = commands.cache_prune(
                session,
                keep_bytes=commands.parse_size(ns.keep_bytes) if ns.keep_bytes else None,
                keep_duration=commands.parse_duration(ns.keep_duration)
                if ns.keep_duration
                else None,
                dry_run=ns.dry_run,
            )
            for line in lines:
                print(("would remove " if ns.dry_run else "removed ") + line)
            verb = "would free" if ns.dry_run else "freed"
            print(f"{verb} {commands.human(freed)}")
        elif ns.cache_command == "verify":
            findings = repaired + commands.cache_verify(session)
            for f in findings:
                print(f)
            print(
                "cache verified: "
                + (f"{len(findings)} problems fixed" if findings else "no corruption")
            )
    return 0


_GC_DEFAULTS = (700, 10, 10)


EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, systemd, Kubernetes, CI runners), raised in the main thread as
    Ctrl-C raises KeyboardInterrupt, so it unwinds the same way: running RUN steps are
    killed, their active snapshots removed, the index writer abandoned, nothing half-written
    recorded; then lbuild exits 143."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM must not interrupt the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def run() -> None:
    """The ``lbuild`` command: ``main``, then exit without tearing the interpreter down.

    Finalising the modules a build imports (networkx above all) costs about 30 ms at exit,
    a tenth of an edit rebuild.  Every resource lbuild holds is released before ``main``
    returns (``with`` blocks: locks, the index writer, sandboxes, temp directories), so the
    only things left to do are flushing the standard streams and exiting.
    """
    import gc

    # A one-shot command allocates a lot and keeps most of it (imports, the plan, TOCs):
    # the default thresholds run full collections over it several times for nothing (about
    # 25 ms of a 0.37 s edit rebuild here). `watch` puts the defaults back.
    gc.set_threshold(100_000, 50, 50)
    signal.signal(signal.SIGTERM, _on_sigterm)  # `watch` installs its own
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    try:
        if ns.command == "build":
            return cmd_build(ns)
        if ns.command == "plan":
            return cmd_plan(ns)
        if ns.command == "why":
            return cmd_why(ns)
        if ns.command == "cache":
            return cmd_cache(ns)
        if ns.command in ("diff", "repro-check"):
            from builder.compare.command import cmd_diff, cmd_repro

            return cmd_diff(ns) if ns.command == "diff" else cmd_repro(ns)
        if ns.command in ("pull", "push"):
            from builder.registrycmd import cmd_pull, cmd_push

            return cmd_pull(ns) if ns.command == "pull" else cmd_push(ns)
        if ns.command == "unpack":
            from builder.unpackcmd import cmd_unpack

            return cmd_unpack(ns)
        if ns.command == "watch":
            import gc

            from builder.watch import cmd_watch

            gc.set_threshold(*_GC_DEFAULTS)  # a long-lived process: the usual collections
            return cmd_watch(ns)
    except LbuildError as e:
        print(f"lbuild: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            print("lbuild: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        print("lbuild: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lbuild cache ls | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # the machine said no: disk full, permissions on the cache home, ...
        where = f" {e.filename}:" if e.filename else ""
        hint = ""
        if e.errno in (28, 122):  # ENOSPC, EDQUOT (errno is not imported on the hot path)
            hint = " (hint: free some space, or run `lbuild cache prune`)"
        print(f"lbuild: error:{where} {e.strerror or e}{hint}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("LBUILD_DEBUG"):
            raise
        if type(e).__module__ == "sqlite3":  # the stdlib read path met a damaged index
            from cache.index.repair import REPAIR_HINT, is_damage

            if is_damage(e):
                print(
                    f"lbuild: error: the cache index is damaged: {e} (hint: {REPAIR_HINT})",
                    file=sys.stderr,
                )
                return EXIT_BUILD_FAILED
        print(
            f"lbuild: internal error: {type(e).__name__}: {e} (set LBUILD_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_BUILD_FAILED
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
