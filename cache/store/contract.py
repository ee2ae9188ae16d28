"""The content store's contract (a Protocol): blobs named by sha256, verified on the way in,
read-only once committed, checked on the way out.

:class:`cache.store.blobs.BlobStore` is the store; wrappers (the progress views' metered
store) keep to the same contract.  Vocabulary: a blob is *committed* once ``ingest`` renamed
it into place; *available* when committed or fetchable from a shared cache (``fallback``);
*checked* when this process hashed its bytes (written here, or ``check_out`` read them).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore, BlobWriter
    from cache.types import Digest


class ContentStore(Protocol):
    """What the builder may do with the content store."""

    root: Path

    def has(self, d: Digest) -> bool: ...
    def available(self, d: Digest) -> bool: ...
    def ensure(self, d: Digest) -> bool: ...
    def path(self, d: Digest) -> Path: ...
    def ingest(self, expected: Digest | None = None) -> AbstractContextManager[BlobWriter]: ...
    def put(self, data: bytes) -> Digest: ...
    def put_stream(self, src: BinaryIO, expected: Digest | None = None) -> Digest: ...
    def open(self, d: Digest) -> BinaryIO: ...
    def read(self, d: Digest) -> bytes: ...
    def size(self, d: Digest) -> int: ...
    def is_checked(self, d: Digest) -> bool: ...
    def check_out(self, d: Digest) -> None: ...
    def vouch(self, d: Digest, actual: Digest) -> None: ...


if TYPE_CHECKING:  # mypy proves the store keeps to the contract

    def _implementation(store: BlobStore) -> ContentStore:
        return store
