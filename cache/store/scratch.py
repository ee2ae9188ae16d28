"""A content store that reads a home's blobs and writes elsewhere (``lbuild plan`` and ``why``).

Planning may need blobs the home does not have: a base image's manifest and config from a
registry or an OCI layout, the records of a ``--cache-from`` source.  A command that must
change nothing under the home commits them to a private scratch directory instead; blobs the
home already has are read in place and never removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from cache.store.blobs import BlobStore
from cache.types import Digest, digest_hex, sha256_digest


class ScratchStore(BlobStore):
    """Blobs of ``lower`` (a home's ``blobs/sha256``, which may not exist) read in place; new
    blobs committed under ``root`` (a scratch directory that the caller removes)."""

    def __init__(self, root: Path, lower: Path) -> None:
        super().__init__(root)
        self.lower = lower

    def _lower(self, d: Digest) -> Path | None:
        p = self.lower / digest_hex(d)
        return p if p.is_file() else None

    def path(self, d: Digest) -> Path:
        own = super().path(d)  # validates the digest
        if own.is_file():
            return own
        return self._lower(d) or own

    def remove(self, d: Digest) -> None:
        """Forget a scratch blob; the home's blobs are never removed from here."""
        self._checked.discard(d)
        super().path(d).unlink(missing_ok=True)

    def digests(self) -> Iterator[Digest]:
        seen = set(super().digests())
        yield from seen
        try:
            with os.scandir(self.lower) as it:
                names = [e.name for e in it]
        except FileNotFoundError:
            return
        for name in names:
            if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                d = sha256_digest(name)
                if d not in seen:
                    yield d
