"""``--cache-from`` and ``--cache-to`` around one build (DESIGN.md "Sharing the cache").

Before solving, :func:`open_sources` reads the records of every ``--cache-from`` (a source that
cannot be read is a warning) and lets the content store fetch their blobs on demand; a build
starts that on a thread (:func:`start_sources`) so it overlaps planning.  After
the image is made, :func:`export` writes the records of the steps ``mode`` asks for
(``min``: the stages the image is made of, through FROM; ``max``: every step built) with
their compressed layer and TOC blobs.  A failed ``--cache-to`` fails the build unless it says
``ignore-error=true``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from cache.errors import LbuildError, StoreError

if TYPE_CHECKING:
    from builder.plan.dag import Plan, Step
    from builder.solve.stepcache import IndexCache
    from cache.index.records import StepRecord
    from cache.remote.artifact import Record
    from cache.remote.remote import ExportResult, RemoteCache
    from cache.remote.spec import CacheSpec
    from cache.session import Session
    from cache.types import Compression, Digest


def open_sources(
    specs: Sequence[CacheSpec],
    session: Session,
    warn: Callable[[str], None],
    failed: set[Digest] | None = None,
) -> RemoteCache | None:
    """The ``--cache-from`` sources' records; the store fetches their blobs when needed.
    ``failed`` are blobs a first attempt of this build could not use (their records miss)."""
    if not specs:
        return None
    from cache.remote.remote import RemoteCache

    remote = RemoteCache.open(specs, session.store, lambda t: warn(f"warning: {t}"), failed)
    session.store.fallback = remote
    return remote


class PendingSources:
    """``--cache-from`` sources being read on a thread of their own while the build plans.

    Reading a registry cache's records is a few requests (and, in a new process, importing
    the HTTP client): they overlap the context walk, the hashing and the base image's
    resolution instead of waiting for them.  Nothing else changes: the records are used only
    after :meth:`wait`, which also says the warnings in the order they came and hands the
    store its fallback; blobs are still fetched and verified when a step needs their bytes."""

    def __init__(self, specs: Sequence[CacheSpec], session: Session, failed: set[Digest] | None):
        import threading

        self._session = session
        self._warnings: list[str] = []
        self._remote: RemoteCache | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._open, args=(specs, failed), name="lbuild-cache-from", daemon=True
        )
        self._thread.start()

    def _open(self, specs: Sequence[CacheSpec], failed: set[Digest] | None) -> None:
        try:
            from cache.remote.remote import RemoteCache

            remote = RemoteCache.open(
                specs, self._session.store, lambda t: self._warnings.append(f"warning: {t}"), failed
            )
        except BaseException as e:  # raised again in the build's thread by wait()
            self._error = e
            return
        with self._lock:
            self._remote = remote
            if not self._abandoned:
                return
        remote.close()

    def wait(self, warn: Callable[[str], None]) -> RemoteCache | None:
        """The opened sources (their warnings said now), the store's fallback set."""
        self._thread.join()
        for text in self._warnings:
            warn(text)
        if self._error is not None:
            raise self._error
        self._session.store.fallback = self._remote
        return self._remote

    def abandon(self) -> None:
        """The build failed before it needed the sources: they are closed, now or when the
        thread ends, which is not waited for (a slow or unreachable registry must not hold
        back the build's own error)."""
        with self._lock:
            self._abandoned = True
            remote = self._remote
        if remote is not None:
            remote.close()


def start_sources(
    specs: Sequence[CacheSpec], session: Session, failed: set[Digest] | None = None
) -> PendingSources | None:
    """Start reading the ``--cache-from`` sources (None when there are none)."""
    return PendingSources(specs, session, failed) if specs else None


def prefetch_hits(
    plan: Plan,
    session: Session,
    remote: RemoteCache,
    codec: Compression,
    rebuilt: Callable[[Step], bool],
) -> Callable[[], None]:
    """Start fetching, on a thread, the layer blobs the image will take from ``remote``: those
    of the steps of the image's stages (``steps_for(plan, "min")``) that the local index does
    not have, that are not rebuilt (``--no-cache``) and whose shared blob is compressed as
    this build wants.  They download while the solver runs; returns the wait for the thread.
    A blob that cannot be used is only marked so here (its step is a miss, or the image's own
    fetch says so afterwards)."""
    import contextlib
    import threading

    from builder.solve.stepcache import codec_params

    level, version = codec_params(codec)
    wanted: list[Digest] = []
    for step in steps_for(plan, "min"):
        rec = None if rebuilt(step) else remote.lookup(step.key)
        if rec is None or rec.diff_id is None or session.index.get_step(step.key) is not None:
            continue
        blob = remote.layer_blob(rec.diff_id, codec, level, version)
        if blob is not None:
            wanted.append(blob.digest)

    def run() -> None:
        with contextlib.suppress(LbuildError):  # marked unusable (and warned) by the fetch
            remote.prefetch(wanted)

    thread = threading.Thread(target=run, name="lbuild-prefetch", daemon=True)
    thread.start()
    return thread.join


def steps_for(plan: Plan, mode: str) -> list[Step]:
    """The steps whose records a ``mode=min|max`` export carries."""
    steps = [s for s in plan.steps.values() if s.kind not in ("base", "end")]
    if mode == "max":
        return steps
    chain: set[int] = set()
    stage: int | None = plan.target
    while stage is not None and stage not in chain:
        chain.add(stage)
        stage = plan.stages[stage].base_stage
    return [s for s in steps if s.stage in chain]


def records_for(
    steps: Iterable[Step],
    session: Session,
    cache: IndexCache,
    codec: Compression,
    remote: RemoteCache | None,
) -> list[Record]:
    """The transferable records of ``steps``: from the local index, or as a shared cache
    gave them (a hit whose bytes this build never needed)."""
    out: list[Record] = []
    for step in steps:
        rec = session.index.get_step(step.key)
        if rec is None:
            shared = remote.lookup(step.key) if remote is not None else None
            if shared is not None:
                out.append(shared)
                continue
            raise StoreError(f"--cache-to: step {step.name!r} has no record to export")
        out.append(transferable(rec, session, codec, remote))
    return out


def transferable(
    rec: StepRecord, session: Session, codec: Compression, remote: RemoteCache | None = None
) -> Record:
    """A local step record as it travels: its layer compressed with ``codec`` (compressed
    now only if no such blob exists), and its TOC blob."""
    from builder.solve.stepcache import codec_params, compressed_blob
    from cache.remote.artifact import TOC_MEDIA_TYPE, Blob, Record

    layer = toc = None
    level, version = 0, ""
    if rec.diff_id is not None:
        info = compressed_blob(session, rec.diff_id, codec, remote)
        layer = Blob(info.digest, info.size, info.media_type)
        level, version = codec_params(codec)
        if rec.toc_digest is not None and session.store.ensure(rec.toc_digest):
            toc = Blob(rec.toc_digest, session.store.size(rec.toc_digest), TOC_MEDIA_TYPE)
    return Record(
        key=rec.key,
        diff_id=rec.diff_id,
        layer=layer,
        toc=toc,
        layer_size=rec.layer_size,
        config_delta=rec.config_delta,
        inputs=rec.inputs,
        codec=codec if layer is not None else "",
        level=level,
        codec_version=version,
    )


def export_index(
    session: Session, spec: CacheSpec, *, since: float | None, codec: Compression
) -> ExportResult:
    """``lbuild cache export``: every record of the index (used since ``since``) with its
    blobs; a record whose layer is gone from the store is left out."""
    from cache.remote.remote import export_cache

    recs: list[Record] = []
    for rec in session.full_index.list_steps():
        if since is not None and rec.last_used < since:
            continue
        if rec.diff_id is not None and not session.store.has(rec.diff_id):
            continue
        recs.append(transferable(rec, session, codec))
    return export_cache(spec, recs, session.store)


def import_all(session: Session, spec: CacheSpec, warn: Callable[[str], None]) -> tuple[int, int]:
    """``lbuild cache import``: every record of a cache artifact, its blobs fetched and
    verified first; a record whose blobs cannot be fetched is skipped (and counted)."""
    from builder.solve.stepcache import import_record
    from cache.index.records import Site

    remote = open_sources([spec], session, warn)
    assert remote is not None
    done = skipped = 0
    try:
        for rec, _src in list(remote.records.values()):
            needed = [b.digest for b in rec.blobs()]
            if rec.diff_id is not None:
                needed.append(rec.diff_id)
            try:
                usable = all(session.store.ensure(d) for d in needed)
            except LbuildError:
                usable = False
            if usable:
                import_record(session, rec, Site("", "", -1))
                done += 1
            else:
                skipped += 1
    finally:
        remote.close()
        session.store.fallback = None
    return done, skipped


def export(
    specs: Sequence[CacheSpec],
    records: Sequence[Record] | Callable[[str], Sequence[Record]],
    session: Session,
    remote: RemoteCache | None,
    warn: Callable[[str], None],
) -> list[ExportResult]:
    """Write every ``--cache-to``; ``records`` are the records, or a function of the mode."""
    from cache.remote.remote import export_cache

    results: list[ExportResult] = []
    for spec in specs:
        recs = records(spec.mode) if callable(records) else records
        proved: set[Digest] = set()
        if remote is not None:  # blobs the import found at this very destination
            for src in remote.sources:
                if src.describe() == _describe(spec):
                    proved = {d for d, (_, s) in remote.blobs.items() if s is src}
        try:
            results.append(export_cache(spec, recs, session.store, known_present=proved))
        except (LbuildError, OSError) as e:
            if not spec.ignore_error:
                raise StoreError(f"--cache-to {spec}: {e}") from None
            warn(f"warning: --cache-to {spec}: {e} (ignored: ignore-error=true)")
        except Exception as e:  # a registry's transport error, say
            if not spec.ignore_error:
                raise StoreError(f"--cache-to {spec}: {type(e).__name__}: {e}") from None
            warn(f"warning: --cache-to {spec}: {e} (ignored: ignore-error=true)")
    return results


def _describe(spec: CacheSpec) -> str:
    from cache.remote.transfer import LayoutStore

    if spec.type == "local":
        return LayoutStore(spec.path).describe()
    from cache.registry.reference import parse

    return f"type=registry,ref={parse(spec.where)}"
