"""Chains of committed snapshots: chain ids and making sure a chain exists."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from typing import BinaryIO

from cache.errors import AlreadyExists, InvalidInput
from cache.layers.apply import apply_layer, layer_parents
from cache.layers.view import View, Views
from cache.snapshots.base import LayerStacks, Snapshotter
from cache.types import Digest, Entry, sha256_digest


def chain_id(diff_ids: Sequence[Digest]) -> Digest:
    """The OCI ChainID of a stack of layers (bottom first)."""
    if not diff_ids:
        raise InvalidInput("chain id of an empty layer list")
    cur = diff_ids[0]
    for d in diff_ids[1:]:
        cur = sha256_digest(hashlib.sha256(f"{cur} {d}".encode()).hexdigest())
    return cur


def ensure_chain(
    snap: Snapshotter,
    diff_ids: Sequence[Digest],
    open_layer: Callable[[Digest], BinaryIO],
    toc: Callable[[Digest], Sequence[Entry]] | None = None,
    *,
    reuse: bool = True,
    views: Callable[[Sequence[Digest]], View] | None = None,
) -> str:
    """Make sure a committed snapshot of ``diff_ids`` exists; return its name (its chain id).

    Each snapshot is committed under its chain id.  The copy snapshotter copies the longest
    prefix of the chain that is committed and extracts every missing layer onto that one copy
    (each verified against its diff_id as it streams); the prefixes in between are not
    committed.  The overlay snapshotter stacks layer directories shared by content (``ensure_layer``): only a
    layer whose directory is missing is extracted, or made from the directory of a layer of
    the same shape (``reuse``, ``cache.snapshots.reuse``).  ``toc`` gives a layer's table of contents:
    with it, the directories a layer does not carry get the metadata the layers below give
    them (without it, 0755 root); ``views`` gives the merged view of a prefix of the chain
    when the caller keeps them (``cache.layers.view.Views``; without it, views made here).
    Another process doing the same at once is fine: per-name locks serialise the work and
    "already exists" counts as success.
    """
    if not diff_ids:
        raise InvalidInput("ensure_chain needs at least one layer")
    names = [str(chain_id(diff_ids[: i + 1])) for i in range(len(diff_ids))]
    if isinstance(snap, LayerStacks):  # a declared capability (base.py), not a class
        return _ensure_stacks(snap, diff_ids, names, open_layer, toc, reuse, views)
    # A copy snapshot is a whole tree: the chain is made once, from the longest prefix that
    # exists, by applying every missing layer onto one copy of it (committing each prefix
    # on the way copied the tree once per layer).
    top = names[-1]
    if snap.exists(top):
        return top
    with snap.name_lock(top):
        if snap.exists(top):
            return top
        have = len(names) - 1
        while have > 0 and not snap.exists(names[have - 1]):
            have -= 1
        parent = names[have - 1] if have else None
        _extract_onto(snap, top, parent, diff_ids, have, open_layer)
    return top


def _ensure_stacks(
    snap: Snapshotter,
    diff_ids: Sequence[Digest],
    names: list[str],
    open_layer: Callable[[Digest], BinaryIO],
    toc: Callable[[Digest], Sequence[Entry]] | None,
    reuse: bool,
    views: Callable[[Sequence[Digest]], View] | None,
) -> str:
    assert isinstance(snap, LayerStacks)
    stacks = snap
    # The chain exists up to the first stack that is missing or whose layer directory is
    # (another build may have taken one over: it is made again under the same name).
    have = 0
    while have < len(names) and stacks.has_stack(names[have]):
        have += 1
    if views is None and toc is not None:
        views = Views(toc).of
    for i in range(have, len(names)):
        parents: dict[str, Entry | None] = {}
        entries: Sequence[Entry] | None = None
        if toc is not None and views is not None:
            entries = toc(diff_ids[i])
            # the view of the layers below only when the layer needs a directory from them
            parents = layer_parents(entries, _lookup_below(views, diff_ids[:i]))
        layer = stacks.ensure_layer(diff_ids[i], parents, open_layer, entries, reuse=reuse)
        stacks.commit_stack(names[i], names[i - 1] if i else None, layer)
    return names[-1]


def _lookup_below(
    views: Callable[[Sequence[Digest]], View], below: Sequence[Digest]
) -> Callable[[str], Entry | None]:
    def get(path: str) -> Entry | None:
        return views(below).get(path)

    return get


def _extract_onto(
    snap: Snapshotter,
    name: str,
    parent: str | None,
    chain: Sequence[Digest],
    start: int,
    open_layer: Callable[[Digest], BinaryIO],
) -> None:
    """Commit ``name`` (the snapshot of ``chain``): ``parent`` (the snapshot of
    ``chain[:start]``) with the layers ``chain[start:]`` applied, each verified against its
    diff_id as it streams."""
    key = f"extract-{os.getpid()}-{uuid.uuid4().hex}"
    snap.prepare(key, parent)
    try:
        target, overlay = snap.apply_target(key)
        snap.note_chain(key, chain)
        for diff_id in chain[start:]:
            with open_layer(diff_id) as stream:
                apply_layer(
                    stream, target, expected=diff_id, name=f"layer {diff_id}", overlay=overlay
                )
        snap.commit(name, key)
    except AlreadyExists:
        snap.remove(key)
    except BaseException:
        with contextlib.suppress(Exception):
            snap.remove(key)
        raise
