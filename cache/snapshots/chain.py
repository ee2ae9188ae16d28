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
from cache.layers.view import View
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
) -> str:
    """Make sure committed snapshots exist for every prefix of ``diff_ids``; return the top name.

    Each snapshot is committed under its chain id.  The copy snapshotter extracts each missing
    layer (once opened, verified against its diff_id) onto a copy of the snapshot below.  The
    overlay snapshotter stacks layer directories shared by content (``ensure_layer``): only a
    layer whose directory is missing is extracted.  ``toc`` gives a layer's table of contents:
    with it, the directories a layer does not carry get the metadata the layers below give
    them (without it, 0755 root).  Another process doing the same at once is fine: per-name
    locks serialise the work and "already exists" counts as success.
    """
    if not diff_ids:
        raise InvalidInput("ensure_chain needs at least one layer")
    names = [str(chain_id(diff_ids[: i + 1])) for i in range(len(diff_ids))]
    if isinstance(snap, LayerStacks):  # a declared capability (base.py), not a class
        return _ensure_stacks(snap, diff_ids, names, open_layer, toc)
    parent: str | None = None
    for i, name in enumerate(names):
        if not snap.exists(name):
            with snap.name_lock(name):
                if not snap.exists(name):
                    _extract_one(snap, name, parent, diff_ids[: i + 1], open_layer)
        parent = name
    return names[-1]


def _ensure_stacks(
    snap: Snapshotter,
    diff_ids: Sequence[Digest],
    names: list[str],
    open_layer: Callable[[Digest], BinaryIO],
    toc: Callable[[Digest], Sequence[Entry]] | None,
) -> str:
    assert isinstance(snap, LayerStacks)
    stacks = snap
    # The chain exists up to the highest existing name (a stack is committed on its parent).
    have = len(names)
    while have > 0 and not snap.exists(names[have - 1]):
        have -= 1
    view: View | None = None
    applied = 0  # layers in ``view``
    for i in range(have, len(names)):
        parents: dict[str, Entry | None] = {}
        entries: Sequence[Entry] | None = None
        if toc is not None:
            if view is None:
                view = View()
            while applied < i:
                view.apply(toc(diff_ids[applied]), diff_ids[applied])
                applied += 1
            entries = toc(diff_ids[i])
            parents = layer_parents(entries, view.get)
        layer = stacks.ensure_layer(diff_ids[i], parents, open_layer, entries)
        stacks.commit_stack(names[i], names[i - 1] if i else None, layer)
    return names[-1]


def _extract_one(
    snap: Snapshotter,
    name: str,
    parent: str | None,
    chain: Sequence[Digest],
    open_layer: Callable[[Digest], BinaryIO],
) -> None:
    key = f"extract-{os.getpid()}-{uuid.uuid4().hex}"
    diff_id = chain[-1]
    snap.prepare(key, parent)
    try:
        target, overlay = snap.apply_target(key)
        snap.note_chain(key, chain)
        with open_layer(diff_id) as stream:
            apply_layer(stream, target, expected=diff_id, name=f"layer {diff_id}", overlay=overlay)
        snap.commit(name, key)
    except AlreadyExists:
        snap.remove(key)
    except BaseException:
        with contextlib.suppress(Exception):
            snap.remove(key)
        raise
