"""Solve: run the plan's steps in topological order on a worker pool.

A step whose key has a record (and whose blobs are still in the store) is a hit and is not
run; a miss is executed, its layer written to the content store, and only then its record
committed.  A failing step stops new work; steps already running finish and are not
recorded if the build is failing, and the first failure is the one reported.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from builder.frontend import dockerfile as df
from builder.plan.copyspec import Selected, plan_copy, resolve_chown, select_from_view
from builder.plan.dag import Plan, Step
from builder.plan.imageconfig import ImageState, history_text, iso_time
from builder.plan.keys import layer_content_key
from cache.errors import Interrupted, InvalidInput, LbuildError, Unsupported, disk_full
from cache.layers.view import View, Views, clean
from cache.store.blobs import BlobStore
from cache.types import BlobInfo, Digest, Entry, LayerInfo, StepKey

if TYPE_CHECKING:
    from builder.solve.events import RunContext, StepEvents
    from builder.solve.prefetch import ChainPrefetch, MakeChain

# Steps the scheduler runs itself instead of queueing them behind the pool's work: they
# take no time (a lookup and a record, or a small WORKDIR layer), and a chain position that
# waits for one holds back the RUN after it (and the prefetch of its chain).
def _in_background() -> None:
    """A finisher thread's start: it runs below the steps in the CPU scheduler (nice +10
    for this thread alone).  Compression is wanted only by the export at the end, while a
    RUN's runc and command, and the steps' own threads, are what the build waits for: on a
    machine with fewer cores than runnable work, they go first."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))


_INLINE_KINDS = frozenset({"base", "end", "config", "workdir"})


@dataclass(frozen=True)
class StepResult:
    """What a step left: its layer (None for config-only steps) and whether it was a hit."""

    diff_id: Digest | None
    cached: bool
    seconds: float


@dataclass(frozen=True)
class CacheHit:
    """A step record found for a key: the layer it made (None for config-only steps), the
    layer's size and its TOC blob (see :mod:`cache.layers.toc`) when the record names one."""

    diff_id: Digest | None
    toc_digest: Digest | None = None
    size: int = 0


class StepCache(Protocol):
    """What the solver needs from the step-record index."""

    def lookup(self, step: Step) -> CacheHit | None: ...
    def used(self, step: Step) -> None: ...
    def record(
        self, step: Step, layer: LayerInfo | None, seconds: float, toc_digest: Digest | None
    ) -> None: ...

    # layers by content (see ``Solver.write``); never one whose blob is gone
    def layer_for(self, content_key: StepKey) -> CacheHit | None: ...
    def remember_layer(
        self, content_key: StepKey, layer: LayerInfo, toc_digest: Digest | None
    ) -> None: ...


@dataclass
class Solver:
    """Executes a Plan against a content store and a step cache."""

    plan: Plan
    store: BlobStore
    cache: StepCache
    reporter: StepEvents
    jobs: int = 2
    no_cache: Callable[[Step], bool] = lambda s: False
    epoch: int = 0
    keep_mtime: bool = False
    run_step: Callable[[RunContext, Step], LayerInfo | None] | None = None
    # Called on a worker for each layer of the final image a step wrote, as a task of its own
    # (compression runs in parallel with the steps after it instead of one layer after
    # another at the end, and a dependent step need not wait for it).
    finish_layer: Callable[[Digest], object] | None = None
    # Makes a RUN's parent snapshot chain ahead of the RUN (builder/solve/prefetch.py).
    prefetch_chain: MakeChain | None = None
    results: dict[str, StepResult] = field(default_factory=dict)
    _tocs: dict[Digest, tuple[Entry, ...]] = field(default_factory=dict)
    # diff_id -> TOC blob, for layers whose TOC is not in memory yet (from hit records)
    _toc_blobs: dict[Digest, Digest] = field(default_factory=dict)
    _to_finish: list[Digest] = field(default_factory=list)
    _views: Views | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stage_locks: dict[int, threading.Lock] = field(default_factory=dict)
    # Set when the build is interrupted: running RUN steps kill their sandbox and stop.
    cancel: threading.Event = field(default_factory=threading.Event)

    # --- layer tables of contents and merged views ------------------------------------------
    def toc(self, diff_id: Digest) -> tuple[Entry, ...]:
        with self._lock:
            hit = self._tocs.get(diff_id)
        if hit is not None:
            return hit
        toc = self._stored_toc(diff_id)
        if toc is None:
            from cache.layers.tar import read_toc
            from cache.layers.toc import layer_toc, remember_layer_toc

            # a layer no record names a TOC blob of (a base image's): the blob kept the
            # first time its tar was read, else the tar (read and hashed whole) and that blob
            toc = layer_toc(self.store, diff_id)
            if toc is None:
                with self.store.open(diff_id) as f:
                    toc = read_toc(f)
                with contextlib.suppress(OSError):  # kept for later builds when it can be
                    remember_layer_toc(self.store, diff_id, toc)
        with self._lock:
            self._tocs[diff_id] = toc
        return toc

    def _stored_toc(self, diff_id: Digest) -> tuple[Entry, ...] | None:
        """The layer's TOC from its TOC blob, when a record named one that is still there."""
        with self._lock:
            blob = self._toc_blobs.get(diff_id)
        if blob is None:
            return None
        from cache.errors import NotFound
        from cache.layers.toc import load_toc

        try:
            return load_toc(self.store.read(blob))
        except NotFound:
            return None  # pruned or lost: the tar itself is still there to read

    def _note_toc_blob(self, diff_id: Digest | None, toc_digest: Digest | None) -> None:
        if diff_id is not None and toc_digest is not None:
            with self._lock:
                self._toc_blobs.setdefault(diff_id, toc_digest)

    def remember(self, layer: LayerInfo) -> None:
        with self._lock:
            self._tocs[layer.diff_id] = layer.toc

    def base_diff_ids(self, stage: int) -> list[Digest]:
        sp = self.plan.stages[stage]
        if sp.base_stage is not None:
            return self.stage_diff_ids(sp.base_stage, None)
        if sp.base_image is not None:
            return list(sp.base_image.diff_ids)
        return []

    def stage_diff_ids(self, stage: int, upto: int | None) -> list[Digest]:
        """diff_ids of the chain of ``stage`` before position ``upto`` (None: the whole stage)."""
        ids = self.base_diff_ids(stage)
        for st in self.plan.stages[stage].steps:
            if st.kind in ("base", "end") or (upto is not None and st.pos >= upto):
                continue
            r = self.results.get(st.id)
            if r is not None and r.diff_id is not None:
                ids.append(r.diff_id)
        return ids

    def view(self, stage: int, upto: int | None) -> View:
        """Merged view of ``stage`` before position ``upto`` (None: after the last step);
        shared (``Views``): read it, never change it."""
        return self.chain_view(self.stage_diff_ids(stage, upto))

    def chain_view(self, diff_ids: Sequence[Digest]) -> View:
        """Merged view of a chain of layers (bottom first); shared, as ``view``'s."""
        views = self._views
        if views is None:
            with self._lock:
                if self._views is None:
                    self._views = Views(self.toc)
                views = self._views
        return views.of(diff_ids)

    def read_file(self, view: View) -> Callable[[str], bytes | None]:
        def read(path: str) -> bytes | None:
            from cache.layers.tar import open_member

            p = view.resolve(path)
            e = view.get(p)
            layer = view.layer_of(p)
            if e is None or layer is None or e.type != "file":
                return None
            with open_member(self.store, layer, e) as f:
                return f.read()

        return read

    # --- executing one step -------------------------------------------------------------------
    def execute(self, step: Step) -> LayerInfo | None:
        instr = step.instr
        if step.kind in ("base", "end", "config"):
            return None
        if step.kind == "workdir":
            assert step.state is not None
            wd = clean(_workdir_after(step))
            view = self.view(step.stage, step.pos)
            real = view.resolve(wd)
            if not wd or view.is_dir(real):
                return None
            return self.write(self._workdir_entries(step, wd, view), by_content=True)
        if step.kind == "copy":
            assert isinstance(instr, df.Copy)
            return self.execute_copy(step, instr)
        if step.kind == "run":
            if self.run_step is None:
                raise Unsupported(
                    "RUN is not supported yet", file=self.plan.filename, line=step.line
                )
            return self.run_step(self, step)
        raise AssertionError(step.kind)

    def _workdir_entries(self, step: Step, wd: str, view: View) -> list[Entry]:
        """The layer of a WORKDIR that creates directories: each missing level owned by the
        current USER (a name: its uid and primary gid; a bare uid N: N:N, as BuildKit's
        mkdir does), 0755; the existing levels above them as they are (issue 9)."""
        from dataclasses import replace

        assert step.state is not None
        real = view.resolve(wd)
        owner: tuple[int, int] | None = None
        entries: list[Entry] = []
        cur = ""
        for part in real.split("/"):
            cur = f"{cur}/{part}" if cur else part
            if view.exists(cur):
                if not view.is_dir(cur):
                    raise InvalidInput(
                        f"WORKDIR /{wd}: /{cur} is not a directory",
                        file=self.plan.filename,
                        line=step.line,
                    )
                old = view.get(cur) or Entry(path=cur, type="dir", mode=0o755)
                entries.append(replace(old, path=cur, offset=-1, source=None))
                continue
            if owner is None:
                owner = resolve_chown(
                    step.state.user or "0", self.read_file(view), self.plan.filename, step.line
                ) or (0, 0)
            uid, gid = owner
            entries.append(
                Entry(path=cur, type="dir", mode=0o755, uid=uid, gid=gid, mtime=self.epoch)
            )
        return entries

    def write(
        self, entries: list[Entry], *, by_content: bool = False, step: Step | None = None
    ) -> LayerInfo:
        """Write a layer of ``entries`` (or, with ``by_content``, reuse an identical one).

        Every layer gets a TOC blob (:mod:`cache.layers.toc`), so later builds that hit its record
        need not read the tar back to see what is in it.

        ``by_content`` (COPY, ADD, WORKDIR: entries whose files are all known by digest):
        the layer's bytes are a function of the entries alone, so a *content key* over them
        finds a layer written from the same entries before — by this step when it missed
        only because a step below it changed, or by any other — and that layer is used as
        it is: no file is read, tarred, hashed or compressed again.

        With ``step`` (COPY, ADD), a long copy shows a byte counter: the reporter's
        ``step_bytes(step, done, total)`` when it has one.
        """
        from cache.home import Home
        from cache.layers.retar import MIN_MEMBERS, remember
        from cache.layers.tar import write_layer

        ck = layer_content_key(entries) if by_content else None
        if ck is not None:
            hit = self.cache.layer_for(ck)
            if hit is not None and hit.diff_id is not None:
                self._note_toc_blob(hit.diff_id, hit.toc_digest)
                return LayerInfo(hit.diff_id, hit.size, self.toc(hit.diff_id))
        counter = getattr(self.reporter, "step_bytes", None) if step is not None else None
        progress = None
        if counter is not None:

            def progress(done: int, total: int) -> None:
                counter(step, done, total)

        # a layer by content is written from its previous version's tar when it has one
        # (cache.layers.retar: an edit rewrites the members that changed, copies the rest)
        shapes = Home(self.store.root).tar_shapes if ck is not None else None
        layer = write_layer(entries, self.store, progress, shapes=shapes)
        self.remember(layer)
        toc_digest = self._store_toc(layer)
        if ck is not None:
            self.cache.remember_layer(ck, layer, toc_digest)
            if shapes is not None and len(layer.toc) >= MIN_MEMBERS:
                remember(shapes, layer.toc, layer.diff_id, toc_digest)
        return layer

    def _store_toc(self, layer: LayerInfo) -> Digest:
        from cache.layers.toc import dump_toc

        digest = self.store.put(dump_toc(layer.toc))
        self._note_toc_blob(layer.diff_id, digest)
        return digest

    def execute_copy(self, step: Step, instr: df.Copy) -> LayerInfo:
        file = self.plan.filename
        parent_view: View | None = None
        if not step.link:
            parent_view = self.view(step.stage, step.pos)
        selected: list[Selected]
        keep_owner = False
        if step.selected is not None:
            selected = step.selected
            selected = [self.expand_archive(s, instr) if s.archive else s for s in selected]
        else:
            if step.from_stage is not None:
                src_view = self.view(step.from_stage, None)
            else:
                assert step.from_image is not None
                src_view = self.chain_view(step.from_image.diff_ids)
            if instr.exclude or instr.parents:
                from builder.plan.sourcefilter import select_from_view_filtered

                selected = select_from_view_filtered(
                    src_view, instr.sources, instr.exclude, instr.parents, file, instr.line
                )
            else:
                selected = select_from_view(src_view, instr.sources, file, instr.line)
            keep_owner = True
            selected = [self._with_blob_sources(s, src_view) for s in selected]
        chown = None
        if instr.chown:
            chown = resolve_chown(
                instr.chown,
                self.read_file(parent_view or self.view(step.stage, step.pos)),
                file,
                instr.line,
            )
        from builder.plan.copyspec import parse_chmod
        from builder.plan.dag import copy_is_multi

        multi = copy_is_multi(instr)
        assert step.state is not None
        res = plan_copy(
            selected,
            dest=instr.dest,
            workdir=step.state.workdir,
            multi=multi,
            view=parent_view,
            chown=chown,
            chmod=parse_chmod(instr.chmod, file, instr.line),
            mtime=None if self.keep_mtime else self.epoch,
            keep_ownership=keep_owner,
            file=file,
            line=instr.line,
        )
        return self.write(res.entries, by_content=True, step=step)

    def _with_blob_sources(self, sel: Selected, view: View) -> Selected:
        from dataclasses import replace

        from builder.plan.copyspec import Item
        from cache.types import ContentRef

        items = []
        for it in sel.items:
            e = it.entry
            if e.type == "file":
                layer = view.layer_of(e.path)
                assert layer is not None
                e = replace(e, source=ContentRef(blob=layer, offset=e.offset))
            items.append(Item(it.rel, e, it.hardlink_key))
        return Selected(sel.name, sel.is_dir, tuple(items), sel.archive)

    def expand_archive(self, sel: Selected, instr: df.Copy) -> Selected:
        """ADD of a local archive: its decompressed tar goes to the store; items point into it."""
        from builder.plan.archive import archive_items
        from builder.plan.copyspec import Item
        from cache.layers.tar import import_layer, open_host_file

        src = sel.items[0].entry.source
        assert src is not None and src.host_path is not None
        # the archive the plan hashed: not a symlink or another file swapped in since
        raw = open_host_file(src.host_path, src.ident, sel.items[0].entry.size)
        with io.BufferedReader(cast(io.RawIOBase, raw)) as f:
            info = import_layer(self.store, f, "auto")
        items = [Item("", Entry(path="", type="dir", mode=0o755))]
        pairs = archive_items(
            info.toc, info.diff_id, sel.name, file=self.plan.filename, line=instr.line
        )
        items.extend(Item(rel, e) for rel, e in pairs)
        return Selected(sel.name, True, tuple(items), archive=True)

    # --- scheduling -----------------------------------------------------------------------------
    def run_one(self, step: Step) -> StepResult:
        t0 = time.monotonic()
        if self.cancel.is_set():  # queued before an interrupt: do not start it
            raise Interrupted("build interrupted")
        if step.kind in ("base", "end"):
            return StepResult(None, True, 0.0)
        if not self.no_cache(step):
            hit = self.cache.lookup(step)
            if hit is not None:
                self._note_toc_blob(hit.diff_id, hit.toc_digest)
                self.cache.used(step)
                self.reporter.step_start(step)
                self.reporter.step_done(step, cached=True, seconds=time.monotonic() - t0)
                return StepResult(hit.diff_id, True, time.monotonic() - t0)
        self.reporter.step_start(step)
        try:
            layer = self.execute(step)
        except LbuildError as e:
            self.reporter.step_done(step, cached=False, seconds=time.monotonic() - t0, error=str(e))
            raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            full = disk_full(e, self.store.root, f"while running {step.name}")
            full.file, full.line = self.plan.filename, step.line or None
            self.reporter.step_done(
                step, cached=False, seconds=time.monotonic() - t0, error=str(full)
            )
            raise full from None
        if (
            layer is not None
            and self.finish_layer is not None
            and step.stage in self.final_stages()
        ):
            with self._lock:
                self._to_finish.append(layer.diff_id)
        secs = time.monotonic() - t0
        with self._lock:
            toc_digest = self._toc_blobs.get(layer.diff_id) if layer is not None else None
        self.cache.record(step, layer, secs, toc_digest)
        self.reporter.step_done(step, cached=False, seconds=secs)
        return StepResult(layer.diff_id if layer else None, False, secs)

    def solve(self) -> dict[str, StepResult]:
        dependants = self.plan.dag.successors()
        indeg = dict.fromkeys(dependants, 0)
        for succs in dependants.values():
            for v in succs:
                indeg[v] += 1
        ready = sorted(n for n, d in indeg.items() if d == 0)
        order = {n: i for i, n in enumerate(self.plan.topo_ids())}
        failure: BaseException | None = None
        running: dict[Future[StepResult], str] = {}
        finishing: list[Future[object]] = []
        prefetch = self._prefetcher()

        def finished(n: str, get: Callable[[], StepResult]) -> None:
            nonlocal failure
            try:
                self.results[n] = get()
            except BaseException as e:  # the first failure is the one reported
                if failure is None:
                    failure = e
                if isinstance(e, KeyboardInterrupt):
                    raise
                return
            for succ in dependants[n]:
                indeg[succ] -= 1
                if indeg[succ] == 0:
                    ready.append(succ)

        # Compression has a pool of its own: queued on the steps' pool, it held back the
        # steps after it (a COPY waiting behind two 20 MB layers being compressed).
        with (
            ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool,
            ThreadPoolExecutor(
                max_workers=max(1, self.jobs - 1),
                thread_name_prefix="finish",
                initializer=_in_background,
            ) as finisher,
        ):
            try:
                while ready or running:
                    while ready and failure is None:
                        ready.sort(key=order.__getitem__)
                        n = ready.pop(0)
                        step = self.plan.steps[n]
                        if step.kind in _INLINE_KINDS:
                            finished(n, functools.partial(self.run_one, step))
                        else:
                            running[pool.submit(self.run_one, step)] = n
                    if prefetch is not None and failure is None:
                        prefetch.update()
                    if not running:
                        break
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        finished(running.pop(fut), fut.result)
                    if failure is not None:
                        ready.clear()
                    with self._lock:
                        todo, self._to_finish = self._to_finish, []
                    if self.finish_layer is not None:
                        finishing += [finisher.submit(self.finish_layer, d) for d in todo]
                for job in finishing:
                    try:
                        job.result()
                    except BaseException as e:
                        if failure is None:
                            failure = e
            except BaseException:
                # SIGINT (KeyboardInterrupt) lands here, in the main thread: stop running RUN
                # steps, or leaving the pool would wait for them to finish.
                self.cancel.set()
                raise
            finally:
                if prefetch is not None:
                    prefetch.close()
        if failure is not None:
            raise failure
        return self.results

    def _prefetcher(self) -> ChainPrefetch | None:
        """A ChainPrefetch when this build has RUN steps that will run."""
        if self.prefetch_chain is None or not any(
            st.kind == "run" for st in self.plan.steps.values()
        ):
            return None
        from builder.solve.prefetch import ChainPrefetch

        p = ChainPrefetch(self, self.prefetch_chain)
        return p if p.wanted else None

    # --- the final image ------------------------------------------------------------------------
    def image_state(self, stage: int) -> tuple[ImageState, list[Digest]]:
        """Config (with history) and diff_ids of ``stage`` after all its steps."""
        sp = self.plan.stages[stage]
        end = sp.steps[-1]
        assert end.state is not None
        state = end.state.clone()
        if sp.base_stage is not None:
            base_state, _ = self.image_state(sp.base_stage)
            history = list(base_state.history)
        elif sp.base_image is not None:
            history = [dict(h) for h in sp.base_image.config.get("history") or []]
        else:
            history = []
        created = iso_time(self.epoch)
        for st in sp.steps:
            if st.kind in ("base", "end"):
                continue
            assert st.instr is not None
            r = self.results.get(st.id)
            has_layer = r is not None and r.diff_id is not None
            entry: dict[str, Any] = {
                "created": created,
                "created_by": history_text(st.instr),
                "comment": "lbuild",
            }
            if not has_layer:
                entry["empty_layer"] = True
            history.append(entry)
        state.history = history
        diff_ids = self.stage_diff_ids(stage, None)
        state.diff_ids = list(diff_ids)
        return state, diff_ids

    def final_stages(self) -> set[int]:
        """The target stage and the stages it is built FROM: their layers are the image's."""
        out: set[int] = set()
        stage: int | None = self.plan.target
        while stage is not None and stage not in out:
            out.add(stage)
            stage = self.plan.stages[stage].base_stage
        return out

    def base_blobs(self, stage: int) -> dict[Digest, BlobInfo]:
        """Compressed blobs base images came with (reused as they are)."""
        out: dict[Digest, BlobInfo] = {}
        sp = self.plan.stages[stage]
        if sp.base_stage is not None:
            out.update(self.base_blobs(sp.base_stage))
        if sp.base_image is not None:
            out.update(zip(sp.base_image.diff_ids, sp.base_image.layers, strict=True))
        return out


def _workdir_after(step: Step) -> str:
    assert isinstance(step.instr, df.Workdir)
    from builder.plan.imageconfig import join_workdir

    assert step.state is not None
    return join_workdir(step.state.workdir, step.instr.path)
