"""lbuild's Python API: ``build(BuildOptions)`` and what the commands share with it (prepare a
plan, the no-cache rule).  The CLI is a thin layer over this module.

The values a build takes and gives live in :mod:`builder.options` and are re-exported here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from builder import cacheshare
from builder.images import make_resolver
from builder.options import (
    BuildOptions,
    BuildResult,
    Output,
    full_tag,
    parse_kv,
    parse_output,
    run_clamp,
    source_date_epoch,
    split_tag,
)
from builder.solve.stepcache import IndexCache, compressed_blob
from cache.errors import CorruptBlob, NotFound
from cache.session import Session
from cache.types import Compression, Digest

if TYPE_CHECKING:
    from builder import noop
    from builder.plan.dag import Plan, Step
    from builder.progress import Reporter
    from builder.solve.events import RunContext
    from builder.solve.run import RunSteps
    from builder.solve.solver import Solver
    from cache.index.recorder import Writes
    from cache.remote.artifact import Record
    from cache.remote.remote import RemoteCache
    from cache.types import Entry, LayerInfo

__all__ = [
    "BuildOptions",
    "BuildResult",
    "Output",
    "Session",
    "build",
    "dockerfile_id",
    "no_cache_rule",
    "parse_kv",
    "parse_output",
    "prepare",
]


def prepare(
    opts: BuildOptions,
    session: Session,
    tags_used: dict[str, str] | None = None,
    scans: dict[str, list[tuple[str, os.stat_result]]] | None = None,
    known_dag: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
) -> tuple[Plan, Any]:
    """Parse, select the context and plan (keys included). Returns the plan and the context.

    ``scans`` are directory listings of the context the fast-path probe just took;
    ``known_dag`` the DAG a previous build with the same memo key stored (``make_plan``);
    ``reporter`` shows the progress of base images pulled from registries."""
    from builder.frontend import dockerfile as df
    from builder.frontend.dockerignore import load_ignore
    from builder.plan.context import BuildContext, hash_file, hash_file_if_cached
    from builder.plan.dag import PlanOptions
    from builder.plan.planner import make_plan
    from cache.platform import host_platform

    ctx_dir = opts.context
    if not ctx_dir.is_dir():
        raise NotFound(f"build context not found: {ctx_dir}")
    dfile = opts.dockerfile if opts.dockerfile is not None else ctx_dir / "Dockerfile"
    dockerfile = df.load(dfile)
    rules, _ = load_ignore(ctx_dir, dfile)
    ctx = BuildContext(ctx_dir, rules, scans)
    os_name, arch, _variant = host_platform()
    popts = PlanOptions(
        build_args=dict(opts.build_args),
        target=opts.target,
        epoch=source_date_epoch(opts.epoch),
        keep_mtime=opts.keep_mtime,
        platform=f"{os_name}/{arch}",
        clamp=run_clamp(opts),
    )
    from builder.pull import transfer_for

    resolver = make_resolver(
        session,
        opts.build_contexts,
        tags_used,
        pull=opts.pull,
        offline=opts.offline,
        transfer=transfer_for(reporter),
    )
    from cache.index.statindex import StatIndex

    with StatIndex(session.index) as stats:
        stats.prefetch(ctx.root)
        hasher = stats.hasher(hash_file, hash_file_if_cached)
        plan = make_plan(dockerfile, ctx, popts, resolver, hasher, known_dag)
    return plan, ctx


def dockerfile_id(opts: BuildOptions) -> str:
    """Identity of "the same Dockerfile" across builds (for why): its resolved path, or
    ``CONTEXT/-`` for ``-f -`` (:func:`builder.frontend.names.identity`)."""
    from builder.frontend.names import identity

    return identity(opts.dockerfile, opts.context)


def no_cache_rule(opts: BuildOptions, plan: Plan) -> Callable[[Step], bool]:
    """Which steps must be built again: all (--no-cache) or those of --no-cache-filter stages."""
    filters = {f.lower() for f in opts.no_cache_filter}

    def skip(step: Step) -> bool:
        if opts.no_cache:
            return True
        if not filters:
            return False
        name = plan.stages[step.stage].name
        return name in filters or str(step.stage) in filters

    return skip


def build(
    opts: BuildOptions,
    reporter: Reporter | None = None,
    probe: noop.Probe | None = None,
    *,
    memo: bool = True,
    tocs: dict[Digest, tuple[Entry, ...]] | None = None,
    writer: Literal["auto", "process", "inline", "fast"] = "auto",
    recorder: Writes | None = None,
    collect: list[Record] | None = None,
) -> BuildResult:
    """Build an image: parse, plan, solve, assemble, export and tag.

    ``collect``, when given, receives the transferable record of every step built or reused
    (``lbuild warm`` exports them all at once).

    ``probe`` is what a failed fast-path attempt measured (memo key, context fingerprint);
    ``memo=False`` skips the no-op memo (a watcher knows something changed: the context walk
    that a memo needs would be wasted); ``tocs`` is a layer-TOC cache a long-lived caller
    (the watcher) keeps across builds (a TOC never changes for a diff_id).

    ``writer`` says where index writes happen: ``"process"`` in a child process
    (:mod:`cache.index.buildindex`, :mod:`cache.index.recorder`), ``"fast"`` here through the
    stdlib writer (``cache.index.recorder.InlineWrites``: what a long-lived caller such as the
    watcher wants; ``"inline"`` where it does not apply), ``"inline"`` through SQLAlchemy
    here; ``"auto"`` picks the child unless SQLAlchemy is already imported.  ``recorder`` is
    such a child started ahead by the caller (``cache.home.start_writer``): the build uses
    it or stops it.
    """
    from builder.progress import PlainReporter

    t0 = time.monotonic()
    rep = reporter or PlainReporter()
    if recorder is None and writer == "fast":
        from cache.home import Home, ensure_home, home_dir
        from cache.index.recorder import InlineWrites

        recorder = InlineWrites.open(Home(ensure_home(home_dir(opts.home))).db)
        writer = "inline" if recorder is None else writer
    deferred = recorder is not None or (
        writer == "process" or (writer == "auto" and "sqlalchemy" not in sys.modules)
    )
    try:
        epoch = source_date_epoch(opts.epoch)
        unusable: set[Digest] = set()  # shared-cache blobs a first attempt could not use
        for t in opts.tags:
            split_tag(t)
        if opts.registry_names():  # a bad reference is exit 2 before anything is built
            from cache.registry.reference import parse as parse_reference

            for name in opts.registry_names():
                parse_reference(name)
        try:
            return _build(
                opts, rep, probe, memo, tocs, deferred, recorder, epoch, t0, collect, unusable
            )
        except CorruptBlob as e:
            # The blob was removed as it failed its check on the way out: whatever needs it
            # is a miss now, so one more build makes it again (issue 11 item 7).  A shared
            # cache's blob that could not be used is remembered in ``unusable``: each further
            # attempt is one with fewer hits, so they stop once nothing new fails.
            print(f"lbuild: warning: {e.message}; building what needs it again", file=sys.stderr)
            if recorder is not None:
                recorder.abandon()
            while True:
                known = len(unusable)
                try:
                    return _build(
                        opts, rep, probe, memo, tocs, deferred, None, epoch, t0, collect, unusable
                    )
                except CorruptBlob as again:
                    if len(unusable) == known:
                        raise
                    print(f"lbuild: warning: {again.message}; building what needs it again",
                          file=sys.stderr)
    finally:
        if recorder is not None:
            recorder.abandon()  # a no-op when the session used (and closed) it


def _build(
    opts: BuildOptions,
    rep: Reporter,
    probe: noop.Probe | None,
    memo: bool,
    tocs: dict[Digest, tuple[Entry, ...]] | None,
    deferred: bool,
    recorder: Writes | None,
    epoch: int,
    t0: float,
    collect: list[Record] | None = None,
    unusable: set[Digest] | None = None,
) -> BuildResult:
    with Session.open(opts.home, deferred=deferred, recorder=recorder) as session:
        tags_used: dict[str, str] = {}
        plan, probed, remote = _plan(opts, session, rep, probe, memo, epoch, tags_used, unusable)
        fetching = None
        if remote is not None and _keeps_or_writes(opts):  # the image's shared layers: now
            fetching = cacheshare.prefetch_hits(
                plan, session, remote, opts.compression, no_cache_rule(opts, plan)
            )
        from builder.solve.solver import Solver

        cache = IndexCache(session, dockerfile_id(opts), remote)
        runner = _LazyRun(opts, session)
        solver = Solver(
            plan,
            session.store,
            cache,
            rep,
            jobs=opts.jobs or (os.cpu_count() or 1),
            no_cache=no_cache_rule(opts, plan),
            epoch=epoch,
            keep_mtime=opts.keep_mtime,
            run_step=runner,
            prefetch_chain=runner.prefetch,
            _tocs={} if tocs is None else tocs,
            finish_layer=lambda d: compressed_blob(
                session, d, opts.compression, remote, _counter(rep, "compress", d)
            ),
        )
        _solve(solver, runner)
        cache.flush()
        image = assemble(solver, session, opts.compression, remote)
        if opts.labels or opts.annotations:
            from builder.export.decorate import decorate

            image = decorate(session.store, image, opts.labels, opts.annotations)
        if fetching is not None and remote is not None:
            # a tagged image is whole in the store (push, unpack, export it later without the
            # cache); a file output needs every layer: fetched side by side, each verified,
            # most of them while the solver ran
            fetching()
            remote.prefetch(Digest(b.digest) for b in image.layers)
        _write_outputs(opts, session, image, rep)
        pins = [
            image.manifest_digest,
            image.config_digest,
            *(b.digest for b in image.layers),
            *image.diff_ids,
        ]
        _tag(opts, session, image, pins, rep)
        pushed = _push(opts, session, image.manifest_digest, rep, tags_used, remote)
        _share(opts, session, plan, cache, remote, rep, collect)
        steps = [s for s in plan.steps.values() if s.kind not in ("base", "end")]
        cached = sum(1 for s in steps if solver.results[s.id].cached)
        result = BuildResult(
            image.manifest_digest,
            image.config_digest,
            len(steps),
            cached,
            time.monotonic() - t0,
            pushed=pushed,
        )
        _record_build(session, plan, result)
        if probed is not None:
            _save_memo(session, probed, plan, result, tags_used, pins)
    rep.finish(result)
    return result


def _plan(
    opts: BuildOptions,
    session: Session,
    rep: Reporter,
    probe: noop.Probe | None,
    memo: bool,
    epoch: int,
    tags_used: dict[str, str],
    unusable: set[Digest] | None,
) -> tuple[Plan, noop.Probe | None, RemoteCache | None]:
    """The plan, the no-op probe it reused, and the ``--cache-from`` sources, read on a
    thread while the context is walked and hashed and the base images resolved."""
    from builder import noop

    pending = cacheshare.start_sources(opts.cache_from, session, unusable)
    try:
        probed = probe or (noop.probe(opts, epoch) if memo else None)
        plan, _ctx = prepare(
            opts,
            session,
            tags_used,
            probed.scans if probed is not None else None,
            probed.dag if probed is not None else None,
            reporter=rep,
        )
        check_entitlements(plan, opts)
    except BaseException:
        if pending is not None:
            pending.abandon()
        raise
    return plan, probed, pending.wait(rep.message) if pending is not None else None


def _solve(solver: Solver, runner: _LazyRun) -> None:
    """Run the solver; then what the RUN executor started ahead and did not use goes."""
    try:
        solver.solve()
    finally:
        runner.release()


def _tag(
    opts: BuildOptions, session: Session, image: Any, pins: list[Digest], rep: Reporter
) -> None:
    """``-t``: the local tags, unless the store lacks the image's layers: ``--push`` from a
    shared cache mounts them registry-side and downloads none, and a local tag would name an
    image the store cannot unpack, export or push (a note says so)."""
    if not opts.tags:
        return
    if opts.push and not all(session.store.has(b.digest) for b in image.layers):
        names = ", ".join(full_tag(t) for t in opts.tags)
        rep.message(
            f"note: {names} not tagged in the local store: its layers were not downloaded "
            "(the push mounted them from the cache); `lbuild pull` fetches the image"
        )
        return
    for t in opts.tags:
        session.index.set_tag(full_tag(t), image.manifest_digest, "{}", blobs=pins)


def _keeps_or_writes(opts: BuildOptions) -> bool:
    """Whether the image must be whole in the store: it is tagged (and the tags are not just
    what ``--push`` sends, which mounts the layers from a cache's repository instead of
    downloading them), or written to a file output."""
    return bool(opts.tags and not opts.push) or any(o.type != "registry" for o in opts.outputs)


def _write_outputs(opts: BuildOptions, session: Session, image: Any, rep: Reporter) -> None:
    """``--output type=oci|docker``: the image written where each output says."""
    from builder.export.oci import export_docker_archive, export_oci_archive, export_oci_layout

    out_store = _metered(session.store, rep, "export") if opts.outputs else session.store
    for out in opts.outputs:
        if out.type == "oci":
            tag = split_tag(opts.tags[0])[1] if opts.tags else "latest"
            export = export_oci_archive if out.tar else export_oci_layout
            export(out_store, image, out.dest, tag)
        elif out.type == "docker":
            export_docker_archive(out_store, image, out.dest, [full_tag(t) for t in opts.tags])


def _push(
    opts: BuildOptions,
    session: Session,
    manifest_digest: Digest,
    rep: Reporter,
    tags_used: dict[str, str],
    remote: RemoteCache | None,
) -> tuple[str, ...]:
    """``--output type=registry``, ``--push``: after the local tags; ``REF@DIGEST`` each."""
    if not opts.registry_names():
        return ()
    from builder.export.registry import push_image
    from builder.pull import transfer_for

    return push_image(
        session,
        manifest_digest,
        opts.registry_names(),
        transfer=transfer_for(rep),
        sources=tags_used,
        shared=remote.mount_sources() if remote is not None else None,
    )


def _share(
    opts: BuildOptions,
    session: Session,
    plan: Plan,
    cache: IndexCache,
    remote: RemoteCache | None,
    rep: Reporter,
    collect: list[Record] | None,
) -> None:
    """``--cache-to`` exports, the records ``lbuild warm`` collects; the sources closed."""
    if opts.cache_to:
        cacheshare.export(
            opts.cache_to,
            lambda mode: cacheshare.records_for(
                cacheshare.steps_for(plan, mode), session, cache, opts.compression, remote
            ),
            session,
            remote,
            rep.message,
        )
    if collect is not None:
        collect.extend(
            cacheshare.records_for(
                cacheshare.steps_for(plan, "max"), session, cache, opts.compression, remote
            )
        )
    if remote is not None:
        remote.close()


def _save_memo(
    session: Session,
    probed: noop.Probe,
    plan: Plan,
    result: BuildResult,
    tags_used: dict[str, str],
    pins: list[str],
) -> None:
    """The no-op memo for the next build with the same inputs (and the DAG's order)."""
    from builder import noop

    shown = [
        {"id": s.id, "name": s.name, "key": s.key}
        for s in plan.order()
        if s.kind not in ("base", "end")
    ]
    dag = {**plan.dag.to_json(), "order": plan.topo_ids()}
    noop.save_memo(
        session.home, probed.key, probed.fingerprint, result, shown, tags_used, pins, dag
    )


def _metered(store: Any, rep: Reporter, kind: str) -> Any:
    """``store`` whose long reads report to the progress view (when it shows transfers)."""
    transfer = getattr(rep, "transfer", None)
    if transfer is None:
        return store
    from builder.solve.stepcache import MeteredStore

    return MeteredStore(store, lambda d, done, total: transfer(kind, d, done, total))


def _counter(rep: Reporter, kind: str, digest: str) -> Callable[[int, int], None] | None:
    """A byte counter for a long transfer, shown by the progress views that have one."""
    transfer = getattr(rep, "transfer", None)
    if transfer is None:
        return None
    return lambda done, total: transfer(kind, digest, done, total)


def assemble(
    solver: Solver, session: Session, codec: Compression, remote: RemoteCache | None = None
) -> Any:
    """The target stage's OCI image (config + manifest) in the content store."""
    from builder.export.oci import make_image

    state, diff_ids = solver.image_state(solver.plan.target)
    base = solver.base_blobs(solver.plan.target)
    blobs = [
        base[d] if d in base else compressed_blob(session, d, codec, remote) for d in diff_ids
    ]
    config = state.final_config(solver.epoch)
    return make_image(session.store, config, blobs)


class _LazyRun:
    """The solver's RUN executor and chain prefetcher; builder.solve.run is imported by the
    first RUN (or the first chain a RUN will need), not before."""

    def __init__(self, opts: BuildOptions, session: Session) -> None:
        import threading

        self.opts = opts
        self.session = session
        self._run: RunSteps | None = None
        self._lock = threading.Lock()

    def _get(self) -> RunSteps:
        with self._lock:
            if self._run is None:
                self._run = _make_run_step(self.opts, self.session)
            return self._run

    def __call__(self, solver: RunContext, step: Step) -> LayerInfo | None:
        return self._get()(solver, step)

    def prefetch(self, solver: RunContext, diff_ids: list[Digest]) -> None:
        self._get().prefetch(solver, diff_ids)

    def release(self) -> None:
        """After the solve: what the RUN executor started ahead and did not use goes."""
        if self._run is not None:
            self._run.release()


def check_entitlements(plan: Plan, opts: BuildOptions) -> None:
    """A RUN --network=host without ``--allow network.host`` (or a RUN --security=insecure)
    fails the build before any step runs (exit 2), cached or not, as BuildKit refuses it."""
    host = [
        s.instr
        for s in plan.steps.values()
        if s.kind == "run"
        and (
            (getattr(s.instr, "network", None) or "").lower() == "host"
            or (getattr(s.instr, "security", None) or "").lower() == "insecure"
        )
    ]
    if host:
        from builder.solve.run import check_entitlements as check

        check([i for i in host if i is not None], frozenset(opts.allow), plan.filename)


def _make_run_step(opts: BuildOptions, session: Session) -> RunSteps:
    from builder.solve.run import RunEnv, make_run_step

    clamp = run_clamp(opts)
    # Absolute: the sandbox helper that binds them works from / (a relative context's bind
    # mount source or a relative --secret src= was "no such file or directory" there).
    env = RunEnv(
        session.home,
        Path(os.path.abspath(opts.context)),
        {k: Path(os.path.abspath(v)) for k, v in opts.secrets.items()},
        opts.snapshotter,
        clamp,
        allow=frozenset(opts.allow),
    )
    return make_run_step(env)


def _record_build(session: Session, plan: Plan, result: BuildResult) -> None:
    """A row in the index's ``builds`` table (a no-op replay by the fast path writes none)."""
    from cache.index.records import BuildRecord

    target = plan.stages[plan.target].name or str(plan.target)
    session.index.add_build(
        BuildRecord(
            started=time.time() - result.seconds,
            target=target,
            manifest_digest=result.manifest_digest,
            seconds=result.seconds,
            steps_hit=result.steps_cached,
            steps_missed=result.steps_total - result.steps_cached,
        )
    )
