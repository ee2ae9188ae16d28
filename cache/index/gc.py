"""Garbage collection of the index: which blobs records and tags reference, and the plan of a
prune (LRU over step records with an age limit and a byte cap; tagged images always kept).

Functions over an open SQLAlchemy session; ``Index.prune_plan`` and ``Index.apply_prune`` run
them in their transactions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from cache.index.values import PrunedStep, PrunePlan
from cache.types import Digest, StepKey

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def _record_blobs(
    diff_id: str | None, toc_digest: str | None, compressed: Mapping[str, list[str]]
) -> set[Digest]:
    out: set[Digest] = set()
    if diff_id is not None:
        out.add(Digest(diff_id))
        out.update(Digest(d) for d in compressed.get(diff_id, ()))
    if toc_digest is not None:
        out.add(Digest(toc_digest))
    return out


def _compressed_by_diff_id(s: Session) -> dict[str, list[str]]:
    from sqlalchemy import select

    from cache.index.models import CompressedRow

    out: dict[str, list[str]] = {}
    for diff_id, digest in s.execute(select(CompressedRow.diff_id, CompressedRow.digest)):
        out.setdefault(diff_id, []).append(digest)
    return out


def _pinned(s: Session) -> set[Digest]:
    from sqlalchemy import select

    from cache.index.models import TagBlobRow, TagRow

    out = {Digest(d) for d in s.scalars(select(TagRow.manifest_digest))}
    out.update(Digest(d) for d in s.scalars(select(TagBlobRow.digest)))
    return out


def referenced(s: Session) -> set[Digest]:
    from sqlalchemy import select

    from cache.index.models import StepRow

    compressed = _compressed_by_diff_id(s)
    out = _pinned(s)
    for diff_id, toc in s.execute(select(StepRow.diff_id, StepRow.toc_digest)):
        out |= _record_blobs(diff_id, toc, compressed)
    return out


def plan_prune(
    s: Session,
    keep_bytes: int | None,
    keep_duration_s: float | None,
    now: float,
    blob_sizes: Mapping[Digest, int],
) -> PrunePlan:
    from sqlalchemy import select

    from cache.index.models import StepRow

    compressed = _compressed_by_diff_id(s)
    pinned = _pinned(s)
    rows = s.execute(
        select(StepRow.key, StepRow.last_used, StepRow.diff_id, StepRow.toc_digest).order_by(
            StepRow.last_used, StepRow.created, StepRow.key
        )
    ).all()

    pruned: list[PrunedStep] = []
    kept: list[tuple[StepKey, float, set[Digest]]] = []
    cutoff = None if keep_duration_s is None else now - keep_duration_s
    for key, last_used, diff_id, toc in rows:
        if cutoff is not None and last_used < cutoff:
            pruned.append(PrunedStep(StepKey(key), last_used, "age"))
        else:
            kept.append((StepKey(key), last_used, _record_blobs(diff_id, toc, compressed)))

    refs: Counter[Digest] = Counter()
    for _, _, blobs in kept:
        refs.update(blobs)

    def weight(digests: Iterable[Digest]) -> int:
        return sum(blob_sizes.get(d, 0) for d in digests)

    live_bytes = weight(pinned | set(refs))
    if keep_bytes is not None:
        evicted = 0
        for key, last_used, blobs in kept:
            if live_bytes <= keep_bytes:
                break
            evicted += 1
            pruned.append(PrunedStep(key, last_used, "size"))
            for d in blobs:
                refs[d] -= 1
                if refs[d] == 0:
                    del refs[d]
                    if d not in pinned:
                        live_bytes -= blob_sizes.get(d, 0)
        kept = kept[evicted:]

    live = pinned | set(refs)
    doomed = tuple(sorted(d for d in blob_sizes if d not in live))
    return PrunePlan(
        steps=tuple(pruned),
        blobs=doomed,
        freed_bytes=weight(doomed),
        kept_bytes=weight(d for d in blob_sizes if d in live),
    )
