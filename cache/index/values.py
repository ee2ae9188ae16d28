"""The index's values: step records, sites, tags, builds, stat rows, prune plans.

Frozen dataclasses that import nothing heavy, so the stdlib read path
(:mod:`cache.index.reader`) returns them without loading SQLAlchemy.  Rows of the models
become these at the boundary; nothing outside cache/index sees an ORM object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from cache.types import Digest, StepKey, direct_init


@dataclass(frozen=True)
class Site:
    """Where a step sits: Dockerfile path + context id, stage name or index, instruction index."""

    dockerfile_id: str
    stage: str
    position: int


@dataclass(frozen=True)
class StepRecord:
    """What the step with ``key`` produced, and when it was made and last used.

    ``diff_id`` is None for a config-only step (then ``layer_size`` is 0 and ``toc_digest``
    None).  ``config_delta`` and ``inputs`` are JSON text owned by the builder.  The site
    fields say where the step was when it was first built; later uses at other sites are
    remembered too (see ``Index.touch_steps``).
    """

    key: StepKey
    diff_id: Digest | None
    layer_size: int
    toc_digest: Digest | None
    config_delta: str
    inputs: str
    dockerfile_id: str
    stage: str
    position: int
    created: float
    last_used: float
    hits: int = 0
    build_seconds: float = 0.0

    @property
    def site(self) -> Site:
        return Site(self.dockerfile_id, self.stage, self.position)

    @property
    def blobs(self) -> frozenset[Digest]:
        """The content-store blobs this record names directly (layer and TOC)."""
        return frozenset(d for d in (self.diff_id, self.toc_digest) if d is not None)


@dataclass(frozen=True)
class TagRecord:
    """A named image: its manifest, free-form metadata, and every blob it needs kept."""

    name: str
    manifest_digest: Digest
    meta_json: str
    updated: float
    blobs: tuple[Digest, ...] = ()


@dataclass(frozen=True)
class BuildRecord:
    """One finished build; ``id`` is assigned by ``Index.add_build`` (0 before)."""

    started: float
    target: str
    manifest_digest: Digest | None
    seconds: float
    steps_hit: int
    steps_missed: int
    id: int = 0


@direct_init
@dataclass(frozen=True)
class StatEntry:
    """A stat-index row: a file's stat tuple when it was hashed, and its blake3 hex.

    ``path`` is absolute and local to this machine; nothing here ever enters a step key.
    """

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    mode: int
    blake3: str

    @classmethod
    def from_stat(cls, path: str, st: os.stat_result, blake3: str) -> StatEntry:
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode, blake3)

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` is the stat tuple this row was recorded with (then ``blake3`` holds)."""
        return (
            self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.inode == st.st_ino
            and self.mode == st.st_mode
        )


@dataclass(frozen=True)
class PrunedStep:
    """A step record a prune removes, and why: ``age`` (unused too long) or ``size`` (LRU)."""

    key: StepKey
    last_used: float
    reason: Literal["age", "size"]


@dataclass(frozen=True)
class PrunePlan:
    """What a prune removes: step records (least recently used first) and blobs.

    ``blobs`` are the blobs of the content store that no kept record and no tag needs
    (including ones no record ever named); ``kept_bytes`` is what the remaining blobs weigh.
    """

    steps: tuple[PrunedStep, ...]
    blobs: tuple[Digest, ...]
    freed_bytes: int
    kept_bytes: int

    @property
    def step_keys(self) -> tuple[StepKey, ...]:
        return tuple(s.key for s in self.steps)
