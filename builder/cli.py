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
from typing import TYPE_CHECKING, Any

from builder import cliargs
from cache.errors import EXIT_BAD_INPUT, EXIT_BUILD_FAILED, EXIT_INTERRUPTED, LbuildError

if TYPE_CHECKING:
    from builder.options import BuildOptions

DEFAULT_DEBOUNCE_MS = cliargs.DEFAULT_DEBOUNCE_MS
DEFAULT_EXEC_GRACE_S = cliargs.DEFAULT_EXEC_GRACE_S


# Build flags that change nothing a plan shows: plan and why do not take them.
BUILD_ONLY = {
    "tags",
    "jobs",
    "compression",
    "secret",
    "snapshotter",
    "allow",
    "labels",
    "annotations",
}


def _build_args(p: argparse.ArgumentParser, *, plan_only: bool = False) -> None:
    """The build flags; ``plan_only``: those that change what a plan shows (plan, why)."""

    def add(*flags: str, **kw: Any) -> None:
        dest = kw.get("dest") or next((f for f in flags if f.startswith("--")), flags[0])
        if plan_only and dest.lstrip("-").replace("-", "_") in BUILD_ONLY:
            return
        p.add_argument(*flags, **kw)

    add("context", metavar="CONTEXT", help="build context directory")
    add(
        "-f",
        "--file",
        dest="dockerfile",
        help="Dockerfile (default CONTEXT/Dockerfile, else CONTEXT/Containerfile; - reads stdin)",
    )
    add("-t", "--tag", dest="tags", action="append", default=[], help="NAME[:TAG]")
    add("--build-arg", action="append", default=[], metavar="K=V")
    add("--build-context", action="append", default=[], metavar="NAME=oci-layout://DIR[:TAG]")
    add("--target", help="stage to build")
    add("--no-cache", action="store_true", help="build every step again")
    add(
        "--no-cache-filter",
        action="append",
        default=[],
        metavar="STAGE",
        help="build these stages again",
    )
    add("--home", type=Path, help="cache directory (default $LBUILD_HOME or ~/.cache/lbuild)")
    add("--jobs", "-j", type=int, default=0, help="parallel steps (default: cores)")
    add("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    add(
        "--keep-mtime",
        action="store_true",
        help="keep context file mtimes in COPY/ADD layers (they then enter the key)",
    )
    add(
        "--source-date-epoch",
        type=int,
        metavar="N",
        help="SOURCE_DATE_EPOCH (also taken from the environment or --build-arg): "
        "file times clamped to it, created and history times equal to it",
    )
    add(
        "--no-rewrite-timestamp",
        action="store_true",
        help="with SOURCE_DATE_EPOCH, keep the times RUN gives its files",
    )
    add(
        "--secret",
        action="append",
        default=[],
        metavar="id=NAME,src=FILE",
        help="a secret for RUN --mount=type=secret (never in a layer or a key)",
    )
    add(
        "--snapshotter",
        choices=["overlay", "copy"],
        help="how RUN gets its root filesystem (default: overlay where possible)",
    )
    _image_args(add)
    add(
        "--allow",
        action="append",
        default=[],
        metavar="ENTITLEMENT",
        help="grant an entitlement: network.host (RUN --network=host)",
    )
    add(
        "--pull",
        action="store_true",
        help="ask the registry again for FROM images pulled before (one manifest HEAD each)",
    )


def _result_args(b: argparse.ArgumentParser) -> None:
    """What a build tells besides its progress: -q, --iidfile, --metadata-file."""
    b.add_argument(
        "-q", "--quiet", action="store_true", help="no progress; only the image ID on stdout"
    )
    b.add_argument("--iidfile", type=Path, metavar="FILE", help="write the image ID to FILE")
    b.add_argument(
        "--metadata-file",
        type=Path,
        metavar="FILE",
        help="write the build result (digests, step counts) to FILE as JSON",
    )


def _image_args(add: Any) -> None:
    """--label and --annotation: what the image carries besides its layers."""
    add(
        "--label",
        dest="labels",
        action="append",
        default=[],
        metavar="K=V",
        help="a label on the image config",
    )
    add(
        "--annotation",
        dest="annotations",
        action="append",
        default=[],
        metavar="[manifest:]K=V",
        help="an annotation on the image manifest",
    )


def _cache_from_args(*parsers: argparse.ArgumentParser) -> None:
    """``--cache-from`` for plan and why: a shared cache answers after the local index."""
    for sp in parsers:
        sp.add_argument(
            "--cache-from",
            action="append",
            default=[],
            metavar="type=local,src=DIR|type=registry,ref=REF",
            help="also look steps up in this shared cache (repeatable, in order)",
        )


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``lbuild`` parser; for an ``argv`` that starts with ``build``, only its subcommand.

    ``lbuild build ...`` reads nothing before or beside the ``build`` subparser (its usage,
    help and errors are its own), so the no-op path neither builds the other subcommands'
    parsers nor imports their modules (warm, compare, registry and cache sharing).
    """
    p = cliargs.Parser(prog="lbuild", description="incremental container image builder")
    p.add_argument("--version", action=cliargs.Version, nargs=0, help="print the version")
    sub = p.add_subparsers(dest="command", required=True)
    _build_parser(sub)
    if argv is not None and argv[:1] == ["build"]:
        return p
    _other_parsers(sub)
    return p


def _build_parser(sub: Any) -> None:
    """The ``build`` subcommand."""
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
    _result_args(b)
    b.add_argument("--push", action="store_true", help="push every -t tag to its registry")
    b.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="type=local,src=DIR|type=registry,ref=REF",
        help="a shared cache to read step records from (repeatable; in order, after the local index)",
    )
    b.add_argument(
        "--cache-to",
        action="append",
        default=[],
        metavar="type=local,dest=DIR|type=registry,ref=REF[,mode=min|max][,ignore-error=true]",
        help="export the step records and their blobs (replaces what is there)",
    )


def _other_parsers(sub: Any) -> None:
    """Every subcommand but ``build``, in the order ``lbuild --help`` lists them."""
    pl = sub.add_parser("plan", help="print the step DAG with keys and HIT/MISS, building nothing")
    _build_args(pl, plan_only=True)
    pl.add_argument("--format", choices=["text", "json", "dot"], default="text")
    pl.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when any step would be built (a cache miss), 0 when every step hits",
    )

    w = sub.add_parser("why", help="explain every cache miss against the last build of the step")
    _build_args(w, plan_only=True)
    _cache_from_args(pl, w)

    home, fmt, csub = _cache_parsers(sub)
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
    from builder.sharecmd import add_cache_parsers, add_warm_parser

    add_cache_parsers(csub, home)  # cache export, cache import
    add_warm_parser(sub)
    # watch and unpack are defined here, not in their modules: a build must not import them
    _watch_parser(sub)
    d = sub.add_parser(
        "daemon",
        help="serve lbuild command lines from a resident process (docs/usage.md, \"daemon\")",
    )
    d.add_argument(
        "--socket",
        metavar="PATH",
        help="listen here (default $LBUILD_DAEMON_SOCKET, else $XDG_RUNTIME_DIR/lbuild/daemon.sock, "
        "else /tmp/lbuild-UID/daemon.sock)",
    )
    from builder.compare.command import add_parsers as compare_parsers

    compare_parsers(sub, _build_args)  # diff, repro-check
    from builder.registrycmd import add_parsers as registry_parsers

    registry_parsers(sub)  # pull, push
    _store_parsers(sub, home, fmt)
    u = sub.add_parser("unpack", help="unpack an image's root filesystem into a directory")
    u.add_argument("image", metavar="IMAGE", help="a local tag, or oci-layout://DIR[:TAG]")
    u.add_argument("dest", metavar="DIR", type=Path, help="must not exist, or be empty")
    u.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")


def _cache_parsers(sub: Any) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, Any]:
    """``cache ls|du|prune`` (verify, export, import join them); the --home and --format
    parents the store commands share."""
    c = sub.add_parser("cache", help="inspect and maintain the cache")
    home = cliargs.Parser(add_help=False)
    home.add_argument("--home", type=Path, help="cache directory (default $LBUILD_HOME)")
    csub = c.add_subparsers(dest="cache_command", required=True)
    fmt = cliargs.Parser(add_help=False)
    fmt.add_argument("--format", choices=["text", "json"], default="text")
    csub.add_parser("ls", parents=[home, fmt], help="list step records, most recently used first")
    csub.add_parser("du", parents=[home, fmt], help="disk use of the cache home, by kind")
    pr = csub.add_parser(
        "prune",
        parents=[home],
        help="remove leftovers, unused snapshots and cache mounts, least recently used "
        "records and the blobs only they need",
    )
    pr.add_argument("--keep-bytes", help="keep at most this much on disk (e.g. 5GB)")
    pr.add_argument("--keep-duration", help="drop what was not used for longer (e.g. 7d, 36h)")
    pr.add_argument("--dry-run", action="store_true", help="only list what would go")
    return home, fmt, csub


def _store_parsers(sub: Any, home: argparse.ArgumentParser, fmt: argparse.ArgumentParser) -> None:
    """``images``, ``tag``, ``rmi``: the local store's tags."""
    sub.add_parser("images", parents=[home, fmt], help="list the images tagged in the store")
    tg = sub.add_parser("tag", parents=[home], help="give a stored image another NAME[:TAG]")
    tg.add_argument("src", metavar="SOURCE", help="NAME[:TAG] of a stored image")
    tg.add_argument("dst", metavar="TARGET", help="the new NAME[:TAG]")
    rm = sub.add_parser("rmi", parents=[home], help="remove tags (their blobs go at a prune)")
    rm.add_argument("names", metavar="NAME[:TAG]", nargs="+")


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


def options_from(ns: argparse.Namespace) -> BuildOptions:
    from builder.options import BuildOptions, parse_allow, parse_kv, parse_output
    from cache.remote.spec import parse_cache_spec

    if getattr(ns, "secret", None):
        from builder.solve.run import secrets_from

    context = cliargs.context_path(ns.context)
    return BuildOptions(
        context=context,
        dockerfile=cliargs.dockerfile_path(ns.dockerfile, context),
        tags=tuple(cliargs.checked_tag(t) for t in getattr(ns, "tags", ())),
        build_args=parse_kv(ns.build_arg, "--build-arg"),
        build_contexts=parse_kv(ns.build_context, "--build-context", from_env=False),
        target=ns.target,
        no_cache=ns.no_cache,
        no_cache_filter=tuple(ns.no_cache_filter),
        outputs=tuple(parse_output(o) for o in getattr(ns, "output", [])),
        home=ns.home,
        jobs=getattr(ns, "jobs", 0),
        compression=getattr(ns, "compression", "gzip"),
        keep_mtime=ns.keep_mtime,
        epoch=_epoch(ns),
        rewrite_timestamp=not ns.no_rewrite_timestamp,
        secrets=secrets_from(ns.secret) if getattr(ns, "secret", None) else {},
        snapshotter=getattr(ns, "snapshotter", None),
        labels=parse_kv(getattr(ns, "labels", ()), "--label", from_env=False),
        annotations=cliargs.parse_annotations(getattr(ns, "annotations", ())),
        allow=parse_allow(getattr(ns, "allow", [])),
        cache_from=tuple(parse_cache_spec(c, to=False) for c in getattr(ns, "cache_from", [])),
        cache_to=tuple(parse_cache_spec(c, to=True) for c in getattr(ns, "cache_to", [])),
        pull=getattr(ns, "pull", False),
        push=getattr(ns, "push", False),
        offline=ns.command == "watch" and not getattr(ns, "pull", False),
    )


def _epoch(ns: argparse.Namespace) -> int | None:
    """--source-date-epoch, else --build-arg SOURCE_DATE_EPOCH=N (as BuildKit takes it), else
    None (the environment's SOURCE_DATE_EPOCH is read later)."""
    if ns.source_date_epoch is not None:
        return int(ns.source_date_epoch)
    for item in ns.build_arg:
        name, sep, value = item.partition("=")
        if name == "SOURCE_DATE_EPOCH" and sep:
            from cache.errors import InvalidInput

            try:
                return int(value)
            except ValueError:
                raise InvalidInput(
                    f"--build-arg SOURCE_DATE_EPOCH must be an integer, got {value!r}"
                ) from None
    return None


_REPORTER: list[Any] = []  # the running build's progress view, told of a failure by main()
_RESIDENT: list[bool] = []  # [True] in a child of `lbuild daemon` (``run_resident``)


def cmd_build(ns: argparse.Namespace) -> int:
    # The index writer starts first, before this process imports the builder: on a miss its
    # SQLAlchemy import overlaps everything this process does; on a no-op it is stopped
    # (a few ms here, the rest on the other core).  A child of the daemon has everything
    # imported already: its writer is a fork of it, no interpreter to start.
    from cache.home import start_writer

    writer = start_writer(ns.home, fork=bool(_RESIDENT))
    try:
        from builder.noop import try_fast
        from builder.options import BuildOptions
        from builder.progress import make_reporter

        mode = "quiet" if ns.quiet else ns.progress
        reporter = make_reporter("plain" if mode == "auto" else mode)
        _REPORTER[:] = [reporter]  # a bad value below still ends a json stream with `error`
        opts = options_from(ns)
        assert isinstance(opts, BuildOptions)
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
        cliargs.write_result(ns, done)
        return 0
    if mode == "auto":
        reporter = make_reporter(mode)
        _REPORTER[:] = [reporter]
    from builder.api import build  # a no-op never imports the builder itself

    result = build(opts, reporter, probe, recorder=writer)
    cliargs.write_result(ns, result)
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    from builder.commands import plan_text, planned
    from builder.options import BuildOptions
    from cache.session import Session

    opts = options_from(ns)
    assert isinstance(opts, BuildOptions)
    with Session.read_only(opts.home) as session:  # plan writes nothing
        _, steps = planned(opts, session)
    print(plan_text(steps, ns.format))
    if ns.exit_code and not all(s.hit for s in steps):
        return EXIT_BUILD_FAILED
    return 0


def cmd_why(ns: argparse.Namespace) -> int:
    from builder.commands import why
    from builder.options import BuildOptions
    from cache.session import Session

    opts = options_from(ns)
    assert isinstance(opts, BuildOptions)
    with Session.read_only(opts.home) as session:  # nor does why
        for ps, reasons in why(opts, session):
            if ps.hit:
                print(f"HIT  {ps.name}" + (f" (from {ps.source})" if ps.source else ""))
            else:
                print(f"MISS {ps.name}")
                for r in reasons:
                    print(f"     - {r}")
    return 0


def cmd_cache(ns: argparse.Namespace) -> int:
    if getattr(ns, "cache_command", None) in ("export", "import"):  # images/tag/rmi have none
        from builder.sharecmd import cmd_cache_share

        return cmd_cache_share(ns)
    from builder.managecmd import cmd_manage

    return cmd_manage(ns)


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


def _daemon(ns: argparse.Namespace) -> int:
    from builder.daemon import serve

    return serve(ns.socket, run_resident)  # its children run each command line with it


def run_resident() -> None:
    """``run`` in a child of ``lbuild daemon``."""
    _RESIDENT[:] = [True]
    run()


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
    from builder.daemon_client import exit_now  # not builder.daemon: its socket import

    exit_now(code)


def _failed(message: str, code: int, err: BaseException | None = None) -> None:
    """Tell the running build's progress view how it ended (``--progress json``: one last
    ``error`` event; on a terminal: the live lines closed, running steps interrupted)."""
    for reporter in _REPORTER:
        fail = getattr(reporter, "fail", None)
        if fail is not None:
            with contextlib.suppress(Exception):
                fail(
                    message, code, file=getattr(err, "file", None), line=getattr(err, "line", None)
                )
    _REPORTER.clear()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        cliargs.cleanup()  # the Dockerfile `-f -` read from stdin


def _main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = cliargs.parse(parser(args), args)
    try:
        if ns.command == "build":
            return cmd_build(ns)
        if ns.command == "plan":
            return cmd_plan(ns)
        if ns.command == "why":
            return cmd_why(ns)
        if ns.command in ("cache", "images", "tag", "rmi"):
            return cmd_cache(ns)
        if ns.command in ("diff", "repro-check"):
            from builder.compare.command import cmd_diff, cmd_repro

            return cmd_diff(ns) if ns.command == "diff" else cmd_repro(ns)
        if ns.command in ("pull", "push"):
            from builder.registrycmd import cmd_pull, cmd_push

            return cmd_pull(ns) if ns.command == "pull" else cmd_push(ns)
        if ns.command == "warm":
            from builder.sharecmd import cmd_warm

            return cmd_warm(ns)
        if ns.command == "unpack":
            from builder.unpackcmd import cmd_unpack

            return cmd_unpack(ns)
        if ns.command == "daemon":
            return _daemon(ns)
        if ns.command == "watch":
            import gc

            from builder.watch import cmd_watch

            gc.set_threshold(*_GC_DEFAULTS)  # a long-lived process: the usual collections
            return cmd_watch(ns, options_from(ns))
    except LbuildError as e:
        _failed(e.message if e.hint is None else f"{e.message} (hint: {e.hint})", e.exit_code, e)
        print(f"lbuild: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated):
            _failed("terminated", EXIT_TERMINATED)
            print("lbuild: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        _failed("interrupted", EXIT_INTERRUPTED)
        print("lbuild: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `lbuild cache ls | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # the machine said no: disk full, permissions on the cache home, ...
        _failed(f"{e.filename or ''}: {e.strerror or e}", EXIT_BUILD_FAILED)
        where = f" {e.filename}:" if e.filename else ""
        hint = ""
        if e.errno in (28, 122):  # ENOSPC, EDQUOT (errno is not imported on the hot path)
            hint = " (hint: free some space, or run `lbuild cache prune`)"
        print(f"lbuild: error:{where} {e.strerror or e}{hint}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("LBUILD_DEBUG"):
            raise
        _failed(f"internal error: {type(e).__name__}: {e}", EXIT_BUILD_FAILED)
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
