"""Plan: stages of expanded instructions -> a networkx DAG of steps, each with its key.

Every node is a ``Step``.  Within a stage a step depends on the step before it; a
``COPY --link``/``ADD --link`` step depends only on its sources, and the step after it
waits for it (that is where the link layer is stacked).  ``FROM <stage>`` and
``COPY --from=<stage>`` tie stages through the stage's ``end`` node.  Stages the target
does not need are never planned.  Keys are computed here, before anything is built, so
``lbuild plan`` can say HIT or MISS without building.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from builder.frontend import dockerfile as df
from builder.plan.context import BuildContext, ContextFile
from builder.plan.copyspec import Item, Selected, has_wildcard, merkle
from builder.plan.imageconfig import ImageState
from builder.plan.sourcefilter import Keep
from cache.errors import InvalidInput, LbuildError, NotFound, Unsupported
from cache.types import BlobInfo, ContentRef, Digest, Entry, StepKey

StepKind = Literal["base", "copy", "run", "workdir", "config", "end"]


@dataclass(frozen=True)
class ExternalImage:
    """An image from outside the Dockerfile: a --build-context oci-layout or a local tag."""

    ref: str
    manifest_digest: Digest
    config: dict[str, Any]
    layers: tuple[BlobInfo, ...]
    diff_ids: tuple[Digest, ...]


ImageResolver = Callable[[str], ExternalImage | None]
Hasher = Callable[[str, os.stat_result], str]


@dataclass
class Step:
    """One node of the plan."""

    id: str
    stage: int
    pos: int
    kind: StepKind
    name: str
    instr: df.Instruction | None = None
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[tuple[str, str], ...] = ()
    run_env: tuple[tuple[str, str], ...] = ()
    link: bool = False
    from_stage: int | None = None
    from_image: ExternalImage | None = None
    selected: list[Selected] | None = None
    state: ImageState | None = None  # config state before this step (after, for base/end)
    key: StepKey = StepKey("")  # noqa: RUF009 (a NewType call, not a mutable default)
    inputs: dict[str, Any] = field(default_factory=dict)
    # ``canonical(inputs)``: what ``key`` hashes, kept for the step's record (a COPY's inputs
    # list every file: encoding them a second time for the index cost ~5 ms of an edit)
    inputs_json: bytes = b""
    line: int = 0


@dataclass
class StagePlan:
    index: int
    name: str | None
    steps: list[Step]
    base_stage: int | None = None
    base_image: ExternalImage | None = None


@dataclass
class Dag:
    """The step DAG as planning lays it out: step ids and dependency edges, in the order
    planning adds them (``add_node``/``add_edge``, networkx's names and meaning).

    ``Plan.graph`` is the networkx ``DiGraph`` made from it; the solver only needs each
    step's dependants and the topological order, so it uses this structure and
    ``Plan.topo_ids()`` and does not import networkx.
    """

    nodes: list[str] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set, repr=False, compare=False)

    def add_node(self, n: str) -> None:
        if n not in self._seen:
            self._seen.add(n)
            self.nodes.append(n)

    def add_edge(self, u: str, v: str) -> None:
        self.add_node(u)
        self.add_node(v)
        self.edges.append((u, v))

    def successors(self) -> dict[str, list[str]]:
        """Each step's dependants (steps that wait for it), no duplicates."""
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for u, v in dict.fromkeys(self.edges):
            out[u].append(v)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "edges": [list(e) for e in self.edges]}


def lexicographic_order(dag: Dag) -> list[str]:
    """The ids of ``dag`` in topological order, the smallest ready id first: the order of
    networkx's ``lexicographical_topological_sort`` on the same graph (a test holds them
    equal), without importing networkx, which costs about 0.05 s of a build that has no
    stored order (a fresh home's first build, from a shared cache above all)."""
    import heapq

    succ = dag.successors()  # one edge per pair, as a DiGraph keeps them
    waiting = dict.fromkeys(dag.nodes, 0)
    for targets in succ.values():
        for v in targets:
            waiting[v] += 1
    ready = [n for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        n = heapq.heappop(ready)
        out.append(n)
        for v in succ[n]:
            waiting[v] -= 1
            if waiting[v] == 0:
                heapq.heappush(ready, v)
    if len(out) != len(waiting):
        raise InvalidInput("the build's steps depend on each other in a circle")
    return out


@dataclass
class Plan:
    """The DAG and what the solver needs next to it.

    ``known_order`` is the topological order of this exact DAG computed before
    (a previous build with the same Dockerfile, arguments and contexts stored it with its
    memo, see builder/noop.py); it is used only when the stored DAG equals this one.
    """

    dag: Dag
    steps: dict[str, Step]
    stages: dict[int, StagePlan]
    target: int
    dockerfile: df.Dockerfile
    filename: str
    known_order: list[str] | None = None
    _graph: Any = field(default=None, repr=False, compare=False)

    @property
    def graph(self) -> Any:
        """The networkx ``DiGraph`` of step ids (built, and networkx imported, on first use)."""
        if self._graph is None:
            import networkx as nx

            g = nx.DiGraph()
            g.add_nodes_from(self.dag.nodes)
            g.add_edges_from(self.dag.edges)
            self._graph = g
        return self._graph

    def topo_ids(self) -> list[str]:
        """Step ids in lexicographical topological order (``lexicographic_order``)."""
        if self.known_order is None:
            self.known_order = lexicographic_order(self.dag)
        return self.known_order

    def order(self) -> list[Step]:
        return [self.steps[n] for n in self.topo_ids()]


@dataclass(frozen=True)
class PlanOptions:
    build_args: Mapping[str, str]
    target: str | None
    epoch: int | None
    keep_mtime: bool
    platform: str
    clamp: int | None = None  # RUN output clamped to SOURCE_DATE_EPOCH (part of RUN keys)


def _norm_stage_ref(ref: str) -> str:
    return ref.lower()


def find_target(dockerfile: df.Dockerfile, target: str | None) -> int:
    if not dockerfile.stages:
        raise InvalidInput("no build stage in Dockerfile", file=dockerfile.filename)
    if target is None:
        return len(dockerfile.stages) - 1
    for st in dockerfile.stages:
        if st.name == target.lower():
            return st.index
    from builder.frontend.suggest import did_you_mean

    names = [st.name for st in dockerfile.stages if st.name]
    maybe = did_you_mean(target.lower(), names, quote=True)
    raise NotFound(
        f"target stage {target!r} could not be found{maybe}", file=dockerfile.filename
    )


def _stage_by_ref(dockerfile: df.Dockerfile, ref: str, before: int | None) -> int | None:
    r = _norm_stage_ref(ref)
    for st in dockerfile.stages:
        if before is not None and st.index >= before:
            break
        if st.name == r:
            return st.index
    if r.isdigit():
        i = int(r)
        if i < len(dockerfile.stages) and (before is None or i < before):
            return i
    return None


def _context_items(
    ctx: BuildContext,
    top: ContextFile,
    hasher: Hasher,
    keep_mtime: bool,
    is_dir: bool,
    keep: Keep | None = None,
) -> tuple[Item, ...]:
    """Items (with content digests) for one selected context source; host owner/mtime dropped.

    ``keep`` (``--exclude``/``--parents``) filters what lies below the source before anything
    is hashed."""

    root = str(ctx.root)

    def host(f: ContextFile) -> str:
        rel = f.real or f.rel  # a followed top-level symlink is opened where it landed
        return root if rel in ("", ".") else f"{root}/{rel}"

    def item(
        f: ContextFile, rel: str, digest: str, path: str | None, st: os.stat_result | None = None
    ) -> Item:
        hl = (f.dev, f.ino) if f.type == "file" and f.nlink > 1 else None
        mtime = f.mtime_ns // 1_000_000_000 if keep_mtime else 0
        e = Entry(
            path=rel,
            type=f.type,
            mode=f.mode,
            uid=0,
            gid=0,
            size=f.size if f.type == "file" else 0,
            digest=digest,
            link=f.link,
            mtime=mtime,
            xattrs=ctx.xattrs(f),
            source=(
                ContentRef(host_path=path, ident=(st.st_dev, st.st_ino) if st else None)
                if path is not None
                else None
            ),
        )
        return Item(rel, e, hl)

    found: list[tuple[ContextFile, str]] = [(top, "")]
    if is_dir:
        prefix = top.rel.rstrip("/") + "/" if top.rel not in ("", ".") else ""
        found.extend((f, f.rel[len(prefix) :]) for f in ctx.walk(top.rel))
        if keep is not None:
            kept = keep([(rel, f.type == "dir") for f, rel in found])
            found = [(f, rel) for f, rel in found if rel in kept]
    # hash every regular file in one batch (the stat index answers most; the rest may be
    # read on several threads), with the walk's own stat: this runs once per context file
    files: list[tuple[str, os.stat_result]] = []
    for f, rel in found:
        if f.type == "file":
            path = host(f)
            st = f.stat
            if st is None:  # a followed top-level symlink is hashed through its target
                st = os.stat(path) if rel == "" and not is_dir else os.lstat(path)
            files.append((path, st))
    many = getattr(hasher, "many", None)
    digests = many(files) if many is not None else [hasher(p, st) for p, st in files]
    hashed = iter(zip(files, digests, strict=True))
    items: list[Item] = []
    for f, rel in found:
        if f.type == "file":
            (path, st), digest = next(hashed)
            items.append(item(f, rel, digest, path, st))  # the writer checks it is this file
        else:
            items.append(item(f, rel, "", None))
    return tuple(items)


def looks_like_archive(path: Path) -> bool:
    """Docker's ADD test: a tar, possibly gzip/bzip2/xz/zstd-compressed (by content, not name)."""
    from builder.plan.archive import is_archive

    return is_archive(path)


def select_context(
    ctx: BuildContext, instr: df.Copy, hasher: Hasher, keep_mtime: bool, file: str
) -> list[Selected]:
    """Resolve a COPY/ADD's context sources (wildcards, dirs, symlinks) into hashed items.

    ``--exclude`` and ``--parents`` filter below each source (builder.plan.sourcefilter)."""
    from builder.plan.sourcefilter import (
        exclude_rules,
        include_rules,
        keep_filter,
        required_path,
        split_parents,
    )

    out: list[Selected] = []
    for src in instr.sources:
        if instr.is_add and ("://" in src or src.startswith("git@")):
            raise Unsupported(
                f"ADD from a URL is not supported yet: {src}", file=file, line=instr.line
            )
    if instr.checksum is not None:  # BuildKit's dispatchCopy: only for one URL or Git source
        raise InvalidInput(
            "checksum requires HTTP(S) or Git sources"
            if len(instr.sources) == 1
            else "checksum can't be specified for multiple sources",
            file=file,
            line=instr.line,
        )
    for src in instr.sources:
        keep = exclude = None
        if instr.exclude:
            exclude = exclude_rules(instr.exclude, file, instr.line)
        source = src
        if instr.parents:
            source, pattern = split_parents(src)
            keep = keep_filter(include_rules(pattern, file, instr.line), exclude)
        elif exclude is not None:
            keep = keep_filter(None, exclude)
        for f in ctx.select(source, file=file, line=instr.line):
            is_dir = f.type == "dir"
            name = posixpath.basename(f.rel.rstrip("/")) if f.rel not in ("", ".") else "."
            try:
                items = _context_items(ctx, f, hasher, keep_mtime, is_dir, keep)
            except LbuildError as e:
                if e.file is None:  # reading the context failed: say which instruction
                    e.file, e.line = file, instr.line
                raise
            except OSError as e:
                raise InvalidInput(
                    f"cannot read {e.filename or src}: {e.strerror}", file=file, line=instr.line
                ) from None
            if instr.parents and is_dir:
                if len(items) == 1 and required_path(source, pattern):
                    raise NotFound(
                        f"{instr.keyword} source not found: {src}", file=file, line=instr.line
                    )
                name = "."  # the directory's contents are copied, under their own paths
            archive = instr.is_add and f.type == "file" and looks_like_archive(ctx.root / f.rel)
            out.append(Selected(name, is_dir, items, archive=archive))
    return out


def _with_onbuild_triggers(stage: df.Stage, state: ImageState, file: str) -> df.Stage:
    """ONBUILD: the triggers the base recorded run first, as Docker runs them; they are
    consumed (the new image does not carry them on)."""
    triggers = state.config.pop("OnBuild", None) or []
    if not triggers:
        return stage
    from dataclasses import replace

    body = (*df.parse_triggers(triggers, file, stage.base.line), *stage.instructions)
    return replace(stage, instructions=body)


def _check_platform(platform: str | None, file: str, stage: df.Stage) -> None:
    """``FROM --platform=P``: lbuild builds for this host only; another platform is exit 2."""
    if platform is None:
        return
    from cache.platform import can_run, host_platform

    try:
        runnable = can_run(platform)
    except ValueError as e:
        raise InvalidInput(str(e), file=file, line=stage.base.line) from None
    if not runnable:
        _os, arch, variant = host_platform()
        host = f"linux/{arch}" + (f"/{variant}" if variant else "")
        raise Unsupported(
            f"FROM --platform={platform}: building for a platform other than this host's "
            f"({host}) is not supported yet",
            file=file,
            line=stage.base.line,
        )


def copy_is_multi(instr: df.Copy) -> bool:
    """Several sources (heredocs included) or a wildcard: the destination is a directory."""
    return len(instr.sources) + len(instr.heredocs) > 1 or any(
        has_wildcard(s) for s in instr.sources
    )


def bind_sources(ctx: BuildContext, instr: df.Run, hasher: Hasher, file: str) -> list[Any]:
    """Merkle rows of what each ``RUN --mount=type=bind`` shows from the context.

    The command reads those files, so their content is an input of the step like a COPY's
    sources.  The mount shows the directory as it is on disk, so no ignore rule applies here.
    """
    from builder.frontend.dockerignore import IgnoreRules
    from builder.frontend.runmount import parse_mount

    rows: list[Any] = []
    whole = BuildContext(ctx.root, IgnoreRules())
    for raw in instr.mounts:
        m = parse_mount(raw, file, instr.line)
        if m.type != "bind" or m.from_:
            continue
        src = m.source or "."
        selected = []
        for f in whole.select(src, file=file, line=instr.line):
            is_dir = f.type == "dir"
            name = posixpath.basename(f.rel.rstrip("/")) if f.rel not in ("", ".") else "."
            selected.append(Selected(name, is_dir, _context_items(whole, f, hasher, False, is_dir)))
        rows.append([m.target, merkle(selected)])
    return rows


def heredoc_sources(instr: df.Copy) -> list[Selected]:
    """``COPY <<EOF /dst``: each heredoc is a file named after its marker (0644, root)."""
    import blake3

    out: list[Selected] = []
    for doc in instr.heredocs:
        data = doc.content.encode()
        e = Entry(
            path="",
            type="file",
            mode=0o644,
            size=len(data),
            digest=blake3.blake3(data).hexdigest(),
            source=ContentRef(data=data),
        )
        out.append(Selected(doc.name, False, (Item("", e),)))
    return out


def _instr_fields(instr: df.Instruction) -> dict[str, Any]:
    import dataclasses

    out: dict[str, Any] = {"type": type(instr).__name__}
    for f in dataclasses.fields(instr):
        if f.name in ("line", "end_line", "original"):
            continue
        v = getattr(instr, f.name)
        if isinstance(v, tuple) and v and isinstance(v[0], df.Heredoc):
            v = [dataclasses.asdict(x) for x in v]
        out[f.name] = v
    return out


def step_name(stage: df.Stage, pos: int, total: int, instr: df.Instruction) -> str:
    label = stage.name or f"stage-{stage.index}"
    text = instr.original.split("\n", 1)[0].strip()
    if len(text) > 80:
        text = text[:77] + "..."
    return f"[{label} {pos + 1}/{total}] {text}"
