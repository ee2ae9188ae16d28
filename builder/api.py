"""lbuild's Python API: ``build(BuildOptions)`` and the helpers the CLI is a thin layer over."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from builder.plan.keys import LAYER_OP
from cache.errors import InvalidInput, LbuildError, NotFound, Unsupported
from cache.home import home_dir
from cache.types import Compression, Digest

if TYPE_CHECKING:
    from builder import noop
    from builder.plan.dag import ExternalImage, Plan, Step
    from builder.progress import Reporter
    from builder.solve.solver import CacheHit, Solver
    from cache.index.buildindex import BuildIndex
    from cache.index.recorder import Recorder
    from cache.index.records import Index, Site
    from cache.store.blobs import BlobStore
    from cache.types import BlobInfo, Entry, LayerInfo, StepKey


@dataclass(frozen=True)
class Output:
    """One ``--output``: ``type=oci,dest=DIR`` or ``type=docker,dest=FILE``."""

    type: str
    dest: Path


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``lbuild build`` takes."""

    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    build_contexts: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()
    home: Path | None = None
    jobs: int = 0
    compression: Compression = "gzip"
    keep_mtime: bool = False
    epoch: int | None = None  # SOURCE_DATE_EPOCH; None reads the environment
    secrets: Mapping[str, Path] = field(default_factory=dict)
    snapshotter: str | None = None  # overlay | copy | None (automatic)


@dataclass(frozen=True)
class BuildResult:
    """A finished build: the image's digests and per-step outcomes."""

    manifest_digest: Digest
    config_digest: Digest
    steps_total: int
    steps_cached: int
    seconds: float


def source_date_epoch(value: int | None) -> int:
    if value is not None:
        return value
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None


def parse_output(spec: str) -> Output:
    """Parse ``type=oci,dest=DIR`` (docker buildx syntax)."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        k, sep, v = part.partition("=")
        if not sep:
            raise InvalidInput(f"invalid --output {spec!r}: expected type=oci,dest=PATH")
        fields[k.strip()] = v.strip()
    typ = fields.get("type", "")
    if typ in ("registry", "image", "local", "tar"):
        raise Unsupported(f"--output type={typ} is not supported yet (use type=oci or type=docker)")
    if typ not in ("oci", "docker"):
        raise InvalidInput(f"invalid --output {spec!r}: type must be oci or docker")
    if not fields.get("dest"):
        raise InvalidInput(f"invalid --output {spec!r}: dest=PATH is required")
    return Output(typ, Path(fields["dest"]))


def parse_kv(items: Sequence[str], what: str, *, from_env: bool = True) -> dict[str, str]:
    """``NAME=VALUE`` flags; a bare ``NAME`` takes the environment's value (as ``docker build
    --build-arg NAME`` does) when ``from_env``, and is an error otherwise."""
    out: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not k or (not sep and not from_env):
            raise InvalidInput(f"invalid {what} {it!r}: expected NAME=VALUE")
        if not sep:
            env = os.environ.get(k)
            if env is None:
                continue
            v = env
        out[k] = v
    return out


def oci_layout_ref(spec: str) -> tuple[str, str] | None:
    """``oci-layout://DIR[:TAG]`` -> (DIR, TAG), TAG defaulting to ``latest``; None otherwise."""
    if not spec.startswith("oci-layout://"):
        return None
    path, tag = spec[len("oci-layout://") :], "latest"
    head, sep, tail = path.rpartition(":")
    if sep and "/" not in tail and head:
        path, tag = head, tail
    return path, tag


def split_tag(name: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); the tag defaults to ``latest``."""
    if not name or name != name.strip() or " " in name:
        raise InvalidInput(f"invalid tag {name!r}")
    repo, tag = name, "latest"
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1 :]
    if not repo or not tag:
        raise InvalidInput(f"invalid tag {name!r}")
    return repo.lower(), tag


def full_tag(name: str) -> str:
    repo, tag = split_tag(name)
    return f"{repo}:{tag}"


@dataclass
class Session:
    """An opened cache home: content store and index. Built at the edge, passed in.

    ``index`` is the full ``Index`` (SQLAlchemy), or for a build opened with
    ``deferred=True`` a ``BuildIndex`` (stdlib reads, writes in a child process; see
    :mod:`cache.index.buildindex`).  Commands that need more than a build's reads and writes use
    ``full_index``.
    """

    home: Path
    store: BlobStore
    index: Index | BuildIndex

    @property
    def full_index(self) -> Index:
        """The SQLAlchemy ``Index`` (only for sessions opened without ``deferred``)."""
        from cache.index.records import Index

        if not isinstance(self.index, Index):
            raise TypeError("this session's index is a build index; open it without deferred")
        return self.index

    @classmethod
    @contextmanager
    def open(
        cls,
        home: Path | None,
        *,
        exclusive: bool = False,
        deferred: bool = False,
        recorder: Recorder | None = None,
    ) -> Iterator[Session]:
        """Open the cache home.

        Builds hold a shared lock for their whole run; prune and verify open with
        ``exclusive=True``, so they wait for running builds and keep new ones out (a blob
        is written before its record, and must not be collected in between).  With
        ``deferred``, index writes go to a child process that also holds that lock until its
        last write is committed; leaving the block waits for it and raises ``StoreError`` if
        a write failed (unless the block is already failing: then the writes that were sent
        are still committed, and the block's own error is the one raised).  ``recorder`` is
        a writer child started ahead (``cache.home.start_writer``), used or abandoned
        here.
        """
        from cache.store.blobs import BlobStore

        h = home_dir(home)
        h.mkdir(parents=True, exist_ok=True)
        with _lock(h, exclusive=exclusive) as lock_fd:
            store = BlobStore(h)
            store.sweep_tmp()
            index: Index | BuildIndex | None = None
            if deferred:
                from cache.index.buildindex import BuildIndex

                index = BuildIndex.open(h / "lbuild.db", keep_fds=(lock_fd,), recorder=recorder)
            elif recorder is not None:
                recorder.abandon()
            if index is None:
                from cache.index.records import Index

                index = Index.open(str(h / "lbuild.db"))
            try:
                yield cls(h, store, index)
            except BaseException:
                with suppress(LbuildError):
                    index.close()
                raise
            index.close()


@contextmanager
def _lock(home: Path, *, exclusive: bool) -> Iterator[int]:
    import fcntl

    fd = os.open(home / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def image_from_store(store: BlobStore, ref: str, manifest_digest: Digest) -> ExternalImage:
    """An image whose manifest and blobs are all in the content store."""
    from builder.plan.dag import ExternalImage
    from cache.types import BlobInfo

    manifest = json.loads(store.read(manifest_digest))
    config = json.loads(store.read(Digest(manifest["config"]["digest"])))
    layers = tuple(
        BlobInfo(Digest(x["digest"]), int(x["size"]), x["mediaType"])
        for x in manifest.get("layers", [])
    )
    diff_ids = tuple(Digest(d) for d in config.get("rootfs", {}).get("diff_ids", []))
    for b, diff_id in zip(layers, diff_ids, strict=True):
        if not store.has(b.digest) and not _recompress(store, b, diff_id):
            raise NotFound(
                f"image {ref}: layer blob {b.digest} is missing from the store",
                hint=f"rebuild {ref}",
            )
    return ExternalImage(ref, manifest_digest, config, layers, diff_ids)


def _recompress(store: BlobStore, blob: BlobInfo, diff_id: Digest) -> bool:
    """Make a missing compressed layer again from its uncompressed tar (same codec, same bytes)."""
    from cache.layers.tar import codec_of, compress_layer

    if not store.has(diff_id):
        return False
    try:
        again = compress_layer(store, diff_id, codec_of(blob.media_type))
    except LbuildError:
        return False
    # Another codec version gives other bytes: not the blob the manifest names (the extra
    # blob is left for the next prune).
    return again.digest == blob.digest


def make_resolver(
    session: Session, build_contexts: Mapping[str, str], used: dict[str, str] | None = None
) -> Callable[[str], ExternalImage | None]:
    """Resolve a FROM / COPY --from name: --build-context first, then lbuild's local tags.

    Local tags resolved are noted in ``used`` (name -> manifest digest) for the no-op memo.
    """
    from builder.export.oci import load_oci_layout

    loaded: dict[str, ExternalImage] = {}

    def resolve(ref: str) -> ExternalImage | None:
        if ref in loaded:
            return loaded[ref]
        spec = build_contexts.get(ref)
        img: ExternalImage | None = None
        if spec is not None:
            layout = oci_layout_ref(spec)
            if layout is None:
                raise Unsupported(f"--build-context {ref}={spec}: only oci-layout:// is supported")
            path, tag = layout
            if not (Path(path) / "index.json").is_file():
                raise NotFound(
                    f"--build-context {ref}: {path} is not an OCI layout (no index.json)"
                )
            image, _layers = load_oci_layout(session.store, Path(path), tag, tocs=False)
            from builder.plan.dag import ExternalImage

            config = json.loads(image.config)
            img = ExternalImage(
                ref, image.manifest_digest, config, tuple(image.layers), tuple(image.diff_ids)
            )
        else:
            try:
                name = full_tag(ref)
            except InvalidInput:
                return None
            found = session.index.get_tag(name)
            if found is not None:
                img = image_from_store(session.store, name, found.manifest_digest)
                if used is not None:
                    used[name] = found.manifest_digest
        if img is not None:
            loaded[ref] = img
        return img

    return resolve


def _layer_site() -> Site:
    from cache.index.records import Site

    return Site("", "", -1)


class IndexCache:
    """The solver's StepCache over the SQLAlchemy index."""

    def __init__(self, session: Session, dockerfile_id: str) -> None:
        self.session = session
        self.dockerfile_id = dockerfile_id
        self.touched: list[tuple[StepKey, Site]] = []

    def _hit(self, key: StepKey) -> CacheHit | None:
        from builder.solve.solver import CacheHit

        rec = self.session.index.get_step(key)
        if rec is None:
            return None
        if rec.diff_id is not None and not self.session.store.has(rec.diff_id):
            return None  # a record whose blob is gone is a miss, never served
        return CacheHit(rec.diff_id, rec.toc_digest, rec.layer_size)

    def _put(
        self,
        key: StepKey,
        layer: LayerInfo | None,
        toc_digest: Digest | None,
        inputs: dict[str, Any],
        site: Site,
        seconds: float,
    ) -> None:
        from cache.index.records import StepRecord

        now = time.time()
        self.session.index.put_step(
            StepRecord(
                key=key,
                diff_id=layer.diff_id if layer else None,
                layer_size=layer.size if layer else 0,
                toc_digest=toc_digest if layer else None,
                config_delta="{}",
                inputs=json.dumps(inputs, sort_keys=True),
                dockerfile_id=site.dockerfile_id,
                stage=site.stage,
                position=site.position,
                created=now,
                last_used=now,
                hits=0,
                build_seconds=seconds,
            )
        )

    def _site(self, step: Step) -> Site:
        from cache.index.records import Site

        return Site(self.dockerfile_id, str(step.stage), step.pos)

    def lookup(self, key: StepKey) -> CacheHit | None:
        return self._hit(key)

    def used(self, step: Step) -> None:
        """Remember a hit, to bump its last-used time and site after the build."""
        self.touched.append((step.key, self._site(step)))

    def record(
        self, step: Step, layer: LayerInfo | None, seconds: float, toc_digest: Digest | None
    ) -> None:
        self._put(step.key, layer, toc_digest, step.inputs, self._site(step), seconds)

    def layer_for(self, content_key: StepKey) -> CacheHit | None:
        """The layer written before from the same entries (a *layer record*: see
        ``Solver.write``), or None; never one whose blob is gone."""
        hit = self._hit(content_key)
        if hit is None or hit.diff_id is None:
            return None
        self.touched.append((content_key, _layer_site()))
        return hit

    def remember_layer(
        self, content_key: StepKey, layer: LayerInfo, toc_digest: Digest | None
    ) -> None:
        """Record a layer under its content key (a step record at no Dockerfile site)."""
        self._put(content_key, layer, toc_digest, {"op": LAYER_OP}, _layer_site(), 0.0)

    def flush(self) -> None:
        """Write the hits of this build (last used, hit count, site) in one transaction."""
        if self.touched:
            self.session.index.touch_steps(
                [k for k, _ in self.touched], time.time(), sites=[s for _, s in self.touched]
            )
            self.touched.clear()


def compressed_blob(session: Session, diff_id: Digest, codec: Compression) -> Any:
    """The compressed blob of a layer, compressing only on a cache miss."""
    from cache.layers.tar import (
        GZIP_DEFAULT_LEVEL,
        ZSTD_DEFAULT_LEVEL,
        codec_version,
        compress_layer,
    )

    level = {"gzip": GZIP_DEFAULT_LEVEL, "zstd": ZSTD_DEFAULT_LEVEL}.get(codec, 0)
    version = codec_version(codec)
    found = session.index.get_compressed(diff_id, codec, level, version)
    if found is not None and session.store.has(found.digest):
        return found
    blob = compress_layer(session.store, diff_id, codec, level)
    session.index.put_compressed(diff_id, codec, level, version, blob)
    return blob


def prepare(
    opts: BuildOptions,
    session: Session,
    tags_used: dict[str, str] | None = None,
    scans: dict[str, list[tuple[str, os.stat_result]]] | None = None,
    known_dag: Mapping[str, Any] | None = None,
) -> tuple[Plan, Any]:
    """Parse, select the context and plan (keys included). Returns the plan and the context.

    ``scans`` are directory listings of the context the fast-path probe just took;
    ``known_dag`` the DAG a previous build with the same memo key stored (``make_plan``)."""
    from builder.frontend import dockerfile as df
    from builder.frontend.dockerignore import load_ignore
    from builder.plan.context import BuildContext, hash_file
    from builder.plan.dag import PlanOptions, make_plan
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
    )
    resolver = make_resolver(session, opts.build_contexts, tags_used)
    from cache.index.statindex import StatIndex

    with StatIndex(session.index) as stats:
        stats.prefetch(ctx.root)
        plan = make_plan(dockerfile, ctx, popts, resolver, stats.hasher(hash_file), known_dag)
    return plan, ctx


def dockerfile_id(opts: BuildOptions) -> str:
    """Identity of "the same Dockerfile" across builds (for why): its resolved path."""
    return str((opts.dockerfile or opts.context / "Dockerfile").resolve())


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
    writer: Literal["auto", "process", "inline"] = "auto",
    recorder: Recorder | None = None,
) -> BuildResult:
    """Build an image: parse, plan, solve, assemble, export and tag.

    ``probe`` is what a failed fast-path attempt measured (memo key, context fingerprint);
    ``memo=False`` skips the no-op memo (a watcher knows something changed: the context walk
    that a memo needs would be wasted); ``tocs`` is a layer-TOC cache a long-lived caller
    (the watcher) keeps across builds (a TOC never changes for a diff_id).

    ``writer`` says where index writes happen: ``"process"`` in a child that imports
    SQLAlchemy while this process builds (:mod:`cache.index.buildindex`), ``"inline"`` through
    SQLAlchemy here (what a long-lived caller such as the watcher wants: it pays the import
    once); ``"auto"`` picks the child unless SQLAlchemy is already imported.  ``recorder``
    is such a child started ahead by the caller (``cache.home.start_writer``): the build
    uses it or stops it.
    """
    from builder.progress import PlainReporter

    t0 = time.monotonic()
    rep = reporter or PlainReporter()
    deferred = recorder is not None or (
        writer == "process" or (writer == "auto" and "sqlalchemy" not in sys.modules)
    )
    try:
        epoch = source_date_epoch(opts.epoch)
        for t in opts.tags:
            split_tag(t)
        return _build(opts, rep, probe, memo, tocs, deferred, recorder, epoch, t0)
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
    recorder: Recorder | None,
    epoch: int,
    t0: float,
) -> BuildResult:
    from builder import noop
    from builder.export.oci import export_docker_archive, export_oci_layout
    from builder.solve.solver import Solver

    with Session.open(opts.home, deferred=deferred, recorder=recorder) as session:
        probed = probe or (noop.probe(opts, epoch) if memo else None)
        tags_used: dict[str, str] = {}
        plan, _ctx = prepare(
            opts,
            session,
            tags_used,
            probed.scans if probed is not None else None,
            probed.dag if probed is not None else None,
        )
        cache = IndexCache(session, dockerfile_id(opts))
        solver = Solver(
            plan,
            session.store,
            cache,
            rep,
            jobs=opts.jobs or (os.cpu_count() or 1),
            no_cache=no_cache_rule(opts, plan),
            epoch=epoch,
            keep_mtime=opts.keep_mtime,
            run_step=_run_step(opts, session),
            _tocs={} if tocs is None else tocs,
            finish_layer=lambda d: compressed_blob(session, d, opts.compression),
        )
        solver.solve()
        cache.flush()
        image = assemble(solver, session, opts.compression)
        for out in opts.outputs:
            if out.type == "oci":
                tag = split_tag(opts.tags[0])[1] if opts.tags else "latest"
                export_oci_layout(session.store, image, out.dest, tag)
            else:
                export_docker_archive(
                    session.store, image, out.dest, [full_tag(t) for t in opts.tags]
                )
        pins = [
            image.manifest_digest,
            image.config_digest,
            *(b.digest for b in image.layers),
            *image.diff_ids,
        ]
        for t in opts.tags:
            session.index.set_tag(full_tag(t), image.manifest_digest, "{}", blobs=pins)
        steps = [s for s in plan.steps.values() if s.kind not in ("base", "end")]
        cached = sum(1 for s in steps if solver.results[s.id].cached)
        result = BuildResult(
            image.manifest_digest, image.config_digest, len(steps), cached, time.monotonic() - t0
        )
        if probed is not None:
            shown = [
                {"id": s.id, "name": s.name, "key": s.key}
                for s in plan.order()
                if s.kind not in ("base", "end")
            ]
            dag = {**plan.dag.to_json(), "order": plan.topo_ids()}
            noop.save_memo(
                session.home, probed.key, probed.fingerprint, result, shown, tags_used, pins, dag
            )
    rep.finish(result)
    return result


def assemble(solver: Solver, session: Session, codec: Compression) -> Any:
    """The target stage's OCI image (config + manifest) in the content store."""
    from builder.export.oci import make_image

    state, diff_ids = solver.image_state(solver.plan.target)
    base = solver.base_blobs(solver.plan.target)
    blobs = [base[d] if d in base else compressed_blob(session, d, codec) for d in diff_ids]
    config = state.final_config(solver.epoch)
    return make_image(session.store, config, blobs)


def _run_step(opts: BuildOptions, session: Session) -> Callable[[Solver, Step], LayerInfo | None]:
    """The solver's RUN executor; builder.solve.run is imported by the first RUN, not before."""
    import threading

    run: list[Callable[[Solver, Step], LayerInfo | None]] = []
    lock = threading.Lock()

    def run_step(solver: Solver, step: Step) -> LayerInfo | None:
        with lock:
            if not run:
                run.append(_make_run_step(opts, session))
        return run[0](solver, step)

    return run_step


def _make_run_step(
    opts: BuildOptions, session: Session
) -> Callable[[Solver, Step], LayerInfo | None]:
    from builder.solve.run import RunEnv, make_run_step

    clamp = (
        source_date_epoch(opts.epoch)
        if (opts.epoch is not None or os.environ.get("SOURCE_DATE_EPOCH"))
        else None
    )
    env = RunEnv(session.home, opts.context, dict(opts.secrets), opts.snapshotter, clamp)
    return make_run_step(env)
