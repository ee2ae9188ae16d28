"""SQLAlchemy models of the cache index (schema version 2); ORM rows never leave ``cache/``.

Each table is read and written by :mod:`cache.index.records` (through the ORM) and, for the hot
no-op rebuild queries, by :mod:`cache.index.reader` (through the stdlib ``sqlite3`` module, with
hand-written SQL over the same column names): renaming a column here means changing both,
bumping ``SCHEMA_VERSION`` and adding a migration in :mod:`cache.index.db`.

Digests are stored as ``sha256:<hex>`` text (71 characters), step keys as 64-hex text,
times as float seconds since the epoch, stat times as integer nanoseconds.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DIGEST_LEN = 71
"""Length of ``sha256:`` + 64 hex digits."""

KEY_LEN = 64
"""Length of a blake3 hex step key."""


class Base(DeclarativeBase):
    """Declarative base of every cache table."""


class MetaRow(Base):
    """One setting of the database itself; ``schema_version`` is the one that matters."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class StepRow(Base):
    """A step record: what a step with a given key produced (see ``records.StepRecord``)."""

    __tablename__ = "steps"

    key: Mapped[str] = mapped_column(String(KEY_LEN), primary_key=True)
    diff_id: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    layer_size: Mapped[int] = mapped_column(BigInteger)
    toc_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    config_delta: Mapped[str] = mapped_column(Text)
    inputs: Mapped[str] = mapped_column(Text)
    dockerfile_id: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)
    created: Mapped[float] = mapped_column(Float)
    last_used: Mapped[float] = mapped_column(Float)
    hits: Mapped[int] = mapped_column(Integer)
    build_seconds: Mapped[float] = mapped_column(Float)

    __table_args__ = (
        Index("ix_steps_last_used", "last_used"),
        Index("ix_steps_diff_id", "diff_id"),
    )


class StepSiteRow(Base):
    """Where in a Dockerfile a step key was last used: the trail ``lbuild why`` follows.

    A key can be used by several Dockerfiles (an identical prefix) and a position can see
    many keys over time (edits); one row per (site, key) pair, deleted with its step.
    """

    __tablename__ = "step_sites"

    dockerfile_id: Mapped[str] = mapped_column(Text, primary_key=True)
    stage: Mapped[str] = mapped_column(Text, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(
        String(KEY_LEN), ForeignKey("steps.key", ondelete="CASCADE"), primary_key=True
    )
    last_used: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_step_sites_key", "key"),)


class CompressedRow(Base):
    """A compressed form of an uncompressed layer: the cached result of compressing it."""

    __tablename__ = "compressed"

    diff_id: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    codec: Mapped[str] = mapped_column(String(16), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, primary_key=True)
    codec_version: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_compressed_digest", "digest"),)


class TagRow(Base):
    """A named image in the cache (``lbuild build -t name``)."""

    __tablename__ = "tags"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    manifest_digest: Mapped[str] = mapped_column(String(DIGEST_LEN))
    meta_json: Mapped[str] = mapped_column(Text)
    updated: Mapped[float] = mapped_column(Float)


class TagBlobRow(Base):
    """A blob a tagged image needs (its config and layer blobs): never garbage collected."""

    __tablename__ = "tag_blobs"

    tag: Mapped[str] = mapped_column(
        Text, ForeignKey("tags.name", ondelete="CASCADE"), primary_key=True
    )
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)


class BuildRow(Base):
    """One finished build: when, what, the result and how much of it came from the cache."""

    __tablename__ = "builds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    started: Mapped[float] = mapped_column(Float)
    target: Mapped[str] = mapped_column(Text)
    manifest_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    seconds: Mapped[float] = mapped_column(Float)
    steps_hit: Mapped[int] = mapped_column(Integer)
    steps_missed: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_builds_started", "started"),)


class StatRow(Base):
    """The stat index: a local file's stat tuple when it was hashed, and its blake3."""

    __tablename__ = "stat_index"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    ctime_ns: Mapped[int] = mapped_column(BigInteger)
    inode: Mapped[int] = mapped_column(BigInteger)
    mode: Mapped[int] = mapped_column(Integer)
    blake3: Mapped[str] = mapped_column(String(KEY_LEN))
