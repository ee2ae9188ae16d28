"""The non-build commands as Python functions: plan, why, cache verify (ls/du/prune and
images/tag/rmi: builder/manage.py).

Each returns plain data or text; builder.cli only parses arguments and prints.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache.errors import InvalidInput

if TYPE_CHECKING:
    from builder.options import BuildOptions
    from builder.plan.dag import Plan, Step
    from cache.session import Session
    from cache.types import Digest


@dataclass(frozen=True)
class PlannedStep:
    """One node of ``lbuild plan``: its key, whether the cache has it, what it waits for."""

    id: str
    name: str
    kind: str
    key: str
    hit: bool
    link: bool
    deps: tuple[str, ...]
    source: str = ""  # the shared cache (--cache-from) a hit came from; "" for the local index


def _visible(step: Step) -> bool:
    return step.kind not in ("end",)


def _visible_deps(plan: Plan, sid: str) -> tuple[str, ...]:
    """The visible steps ``sid`` waits for: a hidden ``end`` node stands for its own deps.

    Edges between stages go through the source stage's ``end`` node (``FROM <stage>``,
    ``COPY --from``); dropping it without following it would lose them.
    """
    out: list[str] = []
    todo = sorted(plan.graph.predecessors(sid))
    seen: set[str] = set()
    while todo:
        d = todo.pop(0)
        if d in seen:
            continue
        seen.add(d)
        if _visible(plan.steps[d]):
            out.append(d)
        else:
            todo.extend(sorted(plan.graph.predecessors(d)))
    return tuple(out)


def _warn(text: str) -> None:
    print(f"lbuild: {text}", file=sys.stderr)


def planned(opts: BuildOptions, session: Session) -> tuple[Plan, list[PlannedStep]]:
    """Plan a build and look every key up, building nothing."""
    from builder.api import dockerfile_id, no_cache_rule, prepare
    from builder.cacheshare import open_sources
    from builder.solve.stepcache import IndexCache

    plan, _ = prepare(opts, session)
    remote = open_sources(opts.cache_from, session, _warn)
    cache = IndexCache(session, dockerfile_id(opts), remote)
    skip = no_cache_rule(opts, plan)
    out: list[PlannedStep] = []
    for step in plan.order():
        if not _visible(step):
            continue
        hit = step.kind == "base" or (not skip(step) and cache.lookup(step) is not None)
        deps = _visible_deps(plan, step.id)
        source = cache.hit_source(step.key) if hit else ""
        out.append(
            PlannedStep(step.id, step.name, step.kind, step.key, hit, step.link, deps, source)
        )
    if remote is not None:
        remote.close()
    return plan, out


def plan_text(steps: list[PlannedStep], fmt: str) -> str:
    """Render ``lbuild plan`` as text, JSON or Graphviz dot."""
    if fmt == "json":
        return json.dumps(
            {
                "steps": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "kind": s.kind,
                        "key": s.key,
                        "status": "HIT" if s.hit else "MISS",
                        "source": s.source or None,
                        "link": s.link,
                        "deps": list(s.deps),
                    }
                    for s in steps
                ]
            },
            indent=2,
        )
    if fmt == "dot":
        lines = ["digraph lbuild {", "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
        for s in steps:
            color = "palegreen" if s.hit else "lightsalmon"
            label = f"{s.name}\\n{s.key[:12]} {'HIT' if s.hit else 'MISS'}".replace('"', '\\"')
            lines.append(f'  "{s.id}" [label="{label}", style=filled, fillcolor={color}];')
            for d in s.deps:
                lines.append(f'  "{d}" -> "{s.id}";')
        lines.append("}")
        return "\n".join(lines)
    rows = []
    for s in steps:
        status = "HIT " if s.hit else "MISS"
        link = " (link)" if s.link else ""
        source = f" (from {s.source})" if s.source else ""
        rows.append(f"{status} {s.key[:12]} {s.name}{link}{source}")
    return "\n".join(rows)


def why(opts: BuildOptions, session: Session) -> list[tuple[PlannedStep, list[str]]]:
    """For every MISS, the reasons against the last record of the same step."""
    from builder.api import dockerfile_id, no_cache_rule
    from builder.why import explain
    from cache.index.readonly import ReadOnlyIndex

    plan, steps = planned(opts, session)
    did = dockerfile_id(opts)
    index = session.index if isinstance(session.index, ReadOnlyIndex) else session.full_index
    skip = no_cache_rule(opts, plan)
    out: list[tuple[PlannedStep, list[str]]] = []
    for ps in steps:
        if ps.hit:
            out.append((ps, []))
            continue
        step = plan.steps[ps.id]
        if opts.no_cache:
            out.append((ps, ["--no-cache"]))
            continue
        if skip(step):
            stage = plan.stages[step.stage].name or str(step.stage)
            out.append((ps, [f"--no-cache-filter {stage}"]))
            continue
        rec = index.last_record_at(did, str(step.stage), step.pos)
        old = json.loads(rec.inputs) if rec is not None else None
        label = step.instr.original.split("\n", 1)[0].strip() if step.instr else step.name
        reasons = explain(old, step.inputs, label)
        base = plan.steps.get(f"{step.stage}:base")
        parent_is_base = base is not None and step.inputs.get("parent") == base.key
        if reasons == ["parent step changed"] and base is not None and parent_is_base:
            # the base step has no record of its own: name what changed below the stage
            # instead of pointing at a FROM that is listed as a HIT
            reasons = [_base_changed(plan, base)]
        if not reasons:
            # same inputs, so the same key: the record is there but its layer is not
            reasons = ["the cached layer is missing from the store"]
        out.append((ps, reasons))
    return out


def _base_changed(plan: Plan, base: Step) -> str:
    sp = plan.stages[base.stage]
    text = base.name.split("] ", 1)[-1]
    if sp.base_image is not None:
        return f"base image changed: {text} is now {sp.base_image.manifest_digest}"
    if sp.base_stage is not None:
        return f"base stage changed: {text}"
    return f"base changed: {text}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_DUR = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_DUR_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str) -> int:
    """``500MB``, ``2GiB``, ``1000`` -> bytes."""
    m = _SIZE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise InvalidInput(f"invalid size {text!r}: expected e.g. 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_duration(text: str) -> float:
    """``36h``, ``7d``, ``1h30m`` -> seconds."""
    t = text.strip().lower()
    parts = _DUR.findall(t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise InvalidInput(f"invalid duration {text!r}: expected e.g. 36h, 7d or 1h30m")
    return sum(float(n) * _DUR_S[u] for n, u in parts)


def cache_verify(session: Session) -> list[str]:
    """Re-hash every blob; drop corrupt blobs and the records that name them; check the
    committed RUN snapshots against their layers' tables of contents (repairing what
    differs, cache.snapshots.verify). Returns findings."""
    findings: list[str] = []
    bad = [d for d in session.store.digests() if not session.store.verify(d)]
    if bad:
        findings += _drop_corrupt(session, bad)
    findings += _verify_snapshots(session)
    return findings


def _verify_snapshots(session: Session) -> list[str]:
    from cache.errors import LbuildError
    from cache.layers.tar import read_toc
    from cache.snapshots.verify import verify_snapshots
    from cache.types import Entry

    def toc_of(d: Digest) -> tuple[Entry, ...] | None:
        if not session.store.has(d):
            return None
        try:
            with session.store.open(d) as f:
                return read_toc(f)
        except LbuildError:
            return None

    return verify_snapshots(session.home / "snapshots", toc_of, session.store.open)


def _drop_corrupt(session: Session, bad: list[Digest]) -> list[str]:
    findings: list[str] = []
    bad_set = set(bad)
    dead = [
        r.key
        for r in session.full_index.list_steps(limit=None, oldest_first=True)
        if r.blobs & bad_set
    ]
    session.full_index.delete_steps(dead)
    for d in bad:
        session.store.remove(d)
        findings.append(f"corrupt blob {d} removed")
    findings += [f"record {k[:16]} dropped (its blob was corrupt)" for k in dead]
    return findings
