"""Chains of committed snapshots: chain ids and making sure a chain exists."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from typing import BinaryIO

from cache.errors import AlreadyExists, InvalidInput
from cache.layers.apply import apply_layer
from cache.snapshots.base import Base, Snapshotter
from cache.types import Digest, sha256_digest


def chain_id(diff_ids: Sequence[Digest]) -> Digest:
    """The OCI ChainID of a stack of layers (bottom first)."""
    if not diff_ids:
        raise InvalidInput("chain id of an empty layer list")
    cur = diff_ids[0]
    for d in diff_ids[1:]:
        cur = sha256_digest(hashlib.sha256(f"{cur} {d}".encode()).hexdigest())
    return cur


def ensure_chain(
    snap: Snapshotter, diff_ids: Sequence[Digest], open_layer: Callable[[Digest], BinaryIO]
) -> str:
    """Make sure committed snapshots exist for every prefix of ``diff_ids``; return the top name.

    Each missing layer is opened once, extracted (and verified) into a fresh active snapshot
    and committed under its chain id.  Another process doing the same at once is fine: a
    per-name lock serialises the work and "already exists" counts as success.
    """
    parent: str | None = None
    for i, diff_id in enumerate(diff_ids):
        name = str(chain_id(diff_ids[: i + 1]))
        if not snap.exists(name):
            lock = snap.name_lock(name) if isinstance(snap, Base) else contextlib.nullcontext()
            with lock:
                if not snap.exists(name):
                    _extract_one(snap, name, parent, diff_id, open_layer)
        parent = name
    if parent is None:
        raise InvalidInput("ensure_chain needs at least one layer")
    return parent


def _extract_one(
    snap: Snapshotter,
    name: str,
    parent: str | None,
    diff_id: Digest,
    open_layer: Callable[[Digest], BinaryIO],
) -> None:
    key = f"extract-{os.getpid()}-{uuid.uuid4().hex}"
    snap.prepare(key, parent)
    try:
        target, overlay = snap.apply_target(key)
        with open_layer(diff_id) as stream:
            apply_layer(stream, target, expected=diff_id, name=f"layer {diff_id}", overlay=overlay)
        snap.commit(name, key)
    except AlreadyExists:
        snap.remove(key)
    except BaseException:
        with contextlib.suppress(Exception):
            snap.remove(key)
        raise

