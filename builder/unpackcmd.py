"""``lbuild unpack IMAGE DIR``: an image's root filesystem, its layers verified while applied.

IMAGE is a tag in lbuild's local store (``lbuild build -t NAME``) or ``oci-layout://DIR[:TAG]``
(TAG defaults to ``latest``), resolved exactly as ``FROM`` resolves them.  Each layer is
extracted by ``cache.layers.apply.apply_layer`` onto one merged tree, whiteouts carried out; the
sha256 of the uncompressed bytes is computed as they stream through and compared with the
config's diff_id, and a compressed blob is also hashed against its manifest digest.  The tree
is built in a hidden sibling directory and renamed to DIR only when every layer checked out,
so a failed unpack leaves DIR as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from cache.errors import DigestMismatch, InvalidInput, LbuildError, NotFound
from cache.types import Digest, sha256_digest

if TYPE_CHECKING:
    from builder.plan.dag import ExternalImage
    from cache.session import Session
    from cache.types import BlobInfo

__all__ = ["UnpackResult", "cmd_unpack", "unpack_image"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class UnpackResult:
    """What ``unpack_image`` did: the image it found and how many layers it applied."""

    ref: str
    manifest_digest: Digest
    layers: int
    dest: Path


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Hashing:
    """A read-only stream that feeds every byte read to sha256 (for the compressed blob)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.hash.update(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def digest(self) -> Digest:
        """sha256 of everything, reading what is left first (the trailing bytes count too)."""
        while self.read(_CHUNK):
            pass
        return sha256_digest(self.hash.hexdigest())


def resolve_image(session: Session, ref: str) -> ExternalImage:
    """IMAGE as ``FROM`` would find it: ``oci-layout://DIR[:TAG]`` or a local tag."""
    from builder.images import make_resolver

    contexts = {ref: ref} if ref.startswith("oci-layout://") else {}
    try:
        image = make_resolver(session, contexts)(ref)
    except LbuildError as e:  # a registry's answer (or none asked): name the image
        e.message = f"image {ref}: {e.message}"
        raise
    if image is None:
        raise NotFound(
            f"image {ref} is not in the local store",
            hint="build it with `lbuild build -t NAME` or name an oci-layout://DIR[:TAG]",
        )
    return image


def _check_dest(dest: Path) -> None:
    if not dest.exists() and not dest.is_symlink():
        if not dest.parent.is_dir():
            raise NotFound(f"unpack: parent directory of {dest} does not exist")
        return
    if dest.is_symlink() or not dest.is_dir():
        raise InvalidInput(f"unpack: {dest} exists and is not a directory")
    if any(dest.iterdir()):
        raise InvalidInput(f"unpack: {dest} is not empty")


def _decompressed(stack: contextlib.ExitStack, src: Any, media_type: str) -> _Readable:
    from cache.layers.tar import codec_of

    codec = codec_of(media_type)
    if codec == "gzip":
        import gzip

        return stack.enter_context(gzip.GzipFile(fileobj=src, mode="rb"))
    if codec == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            src, read_across_frames=True, closefd=False
        )
        return stack.enter_context(reader)
    return src  # type: ignore[no-any-return]


def _apply_one(session: Session, blob: BlobInfo, diff_id: Digest, target: Path, i: int) -> None:
    """Apply layer ``i``: from its uncompressed blob when the store has it, else decompressing."""
    from cache.layers.apply import apply_layer
    from cache.layers.compress import decode_errors

    if session.store.has(diff_id):
        with session.store.open(diff_id) as f:
            apply_layer(f, target, expected=diff_id, name=f"layer {i} blob {diff_id}")
        return
    if not session.store.has(blob.digest):
        raise NotFound(f"layer {i}: blob {blob.digest} is missing from the store")
    bad: tuple[type[Exception], ...] = (*decode_errors(), InvalidInput)
    name = f"layer {i} blob {blob.digest}"
    with session.store.open(blob.digest) as raw:
        hashing = _Hashing(raw)
        try:
            with contextlib.ExitStack() as stack:
                plain = _decompressed(stack, hashing, blob.media_type)
                apply_layer(plain, target, expected=diff_id, name=name)  # type: ignore[arg-type]
        except bad as exc:
            # Corrupt bytes usually break decompression first: name the blob that is wrong.
            actual = hashing.digest()
            if actual != blob.digest:
                raise DigestMismatch(name, blob.digest, actual) from None
            raise InvalidInput(f"{name}: cannot decompress: {exc}") from exc
        actual = hashing.digest()
    if actual != blob.digest:
        raise DigestMismatch(name, blob.digest, actual)


def unpack_image(session: Session, ref: str, dest: Path) -> UnpackResult:
    """Unpack IMAGE into ``dest`` (which must not exist, or be an empty directory)."""
    from cache.layers.apply import remove_tree

    dest = Path(os.path.abspath(dest))
    _check_dest(dest)
    image = resolve_image(session, ref)
    if len(image.layers) != len(image.diff_ids):
        raise InvalidInput(
            f"image {ref}: manifest has {len(image.layers)} layers, "
            f"config {len(image.diff_ids)} diff_ids"
        )
    # Built beside dest so the final rename stays on one filesystem.
    work = dest.parent / f".{dest.name}.unpack-{uuid.uuid4().hex[:12]}"
    try:
        work.mkdir(mode=0o755)
    except OSError as exc:
        raise InvalidInput(f"unpack: cannot write in {dest.parent}: {exc.strerror}") from None
    try:
        for i, (blob, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=True)):
            _apply_one(session, blob, diff_id, work, i)
        if dest.is_dir():
            dest.rmdir()  # checked empty above; rmdir refuses if it filled up meanwhile
        os.rename(work, dest)
    except BaseException:
        remove_tree(work)
        raise
    return UnpackResult(ref, image.manifest_digest, len(image.layers), dest)


def cmd_unpack(ns: argparse.Namespace) -> int:
    """``lbuild unpack IMAGE DIR``."""
    from cache.session import Session

    with Session.open(ns.home) as session:
        res = unpack_image(session, ns.image, ns.dest)
    print(f"unpacked {res.ref} ({res.manifest_digest}, {res.layers} layers) into {res.dest}")
    return 0
