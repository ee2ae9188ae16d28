"""Images to compare, from wherever they are, and their layer tars as streams of members.

``open_image(REF)`` understands:

- ``oci-layout://DIR[:TAG]``, ``oci:DIR[:TAG]``, ``DIR`` and ``DIR:TAG`` (an OCI image layout;
  without a tag, the layout's only image, else ``latest``);
- ``docker-archive:FILE[:NAME]`` and ``FILE`` (a ``docker save`` / ``skopeo copy
  docker-archive:`` tar, uncompressed; NAME picks one of several images by its RepoTags);
- anything else, and ``docker://REF``, is handed to the ``local`` resolver the caller
  supplies (``builder.compare.local``: lbuild's tags, and registry references, pulled into
  lbuild's store).

Nothing is unpacked to disk: ``iter_members`` streams a layer (gzip, zstd or plain, recognised
by its first bytes) through the layer tar reader (``builder.compare.tarscan``) and hashes each
regular file's bytes with blake3 as they pass.  Manifests, configs and indexes read from a layout are checked
against their digests; layer blobs are not (the comparison reads them once, and a layer whose
diff_id equals the other side's is not read at all).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from builder.compare.tarscan import Member, scan
from cache.errors import InvalidInput, NotFound, Unsupported

__all__ = [
    "Image",
    "Layer",
    "LocalResolver",
    "Member",
    "iter_members",
    "open_image",
]

_MAX_METADATA = 16 << 20
_CHUNK = 1 << 20
_REF_NAME = "org.opencontainers.image.ref.name"
_INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MANIFESTS = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


@dataclass(frozen=True)
class Layer:
    """One layer of an image: its descriptor and a way to open its blob.

    ``digest``/``size``/``media_type`` are what the manifest says (a docker archive has no
    manifest: its ``digest`` is empty and ``size`` is the tar's).  ``diff_id`` comes from the
    config.  ``opener`` returns the blob's bytes as stored (compressed or not).
    """

    index: int
    media_type: str
    digest: str
    size: int
    diff_id: str
    opener: Callable[[], BinaryIO] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Image:
    """An image opened for comparison (nothing copied anywhere)."""

    ref: str
    kind: str  # "oci-layout" | "docker-archive" | "local"
    manifest_digest: str | None
    manifest: dict[str, Any] | None
    config_digest: str
    config: dict[str, Any]
    layers: tuple[Layer, ...]
    index: dict[str, Any] | None = None  # the image index the manifest was picked from, if any
    index_digest: str | None = None


LocalResolver = Callable[[str], Image | None]
"""Resolves a name in lbuild's local store of tags to an Image, or None when it has no such tag."""


# ---------------------------------------------------------------------------------------------
# References


def open_image(ref: str, local: LocalResolver | None = None) -> Image:
    """Open ``ref`` (see the module docstring); bad input raises InvalidInput or NotFound."""
    if not ref:
        raise InvalidInput("empty image reference")
    for prefix in ("oci-layout://", "oci:"):
        if ref.startswith(prefix):
            path, tag = _split_tag(ref[len(prefix) :])
            return open_layout(Path(path), tag, ref)
    if ref.startswith("docker-archive:"):
        path, name = _split_archive(ref[len("docker-archive:") :])
        return open_docker_archive(Path(path), name, ref)
    if ref.startswith("docker://"):
        image = local(ref) if local is not None else None
        if image is None:
            raise Unsupported(f"{ref}: a registry reference needs lbuild's store to pull into")
        return image
    p = Path(ref)
    if p.is_dir():
        return open_layout(p, None, ref)
    if p.is_file():
        return open_docker_archive(p, None, ref)
    head, sep, tail = ref.rpartition(":")
    if sep and head and "/" not in tail and Path(head).is_dir():
        return open_layout(Path(head), tail, ref)
    if local is not None:
        image = local(ref)
        if image is not None:
            return image
    if ref.startswith((".", "/")):
        raise NotFound(f"{ref}: no such OCI layout or docker-archive file")
    raise NotFound(
        f"image {ref} not found: not an OCI layout, a docker-archive tar or a local tag",
        hint="name a directory, oci-layout://DIR[:TAG], docker-archive:FILE or a tag from "
        "`lbuild build -t`",
    )


def _split_tag(spec: str) -> tuple[str, str | None]:
    """``PATH[:TAG]`` -> (PATH, TAG or None); a colon inside the last path component only."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail and tail:
        return head, tail
    return spec, None


def _split_archive(spec: str) -> tuple[str, str | None]:
    """``FILE[:NAME]`` where NAME may hold a colon itself (``x:1``): the first prefix that is
    an existing file is the archive."""
    for i, c in enumerate(spec):
        if c == ":" and i and Path(spec[:i]).is_file():
            return spec[:i], spec[i + 1 :] or None
    return spec, None


# ---------------------------------------------------------------------------------------------
# OCI image layouts


def _read_small(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_METADATA + 1)
    except FileNotFoundError:
        raise NotFound(f"{what}: {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInput(f"{what}: {path} is a directory") from None
    except PermissionError:
        raise InvalidInput(f"{what}: {path} is not readable") from None
    if len(data) > _MAX_METADATA:
        raise InvalidInput(f"{what}: {path} is too large for a manifest, config or index")
    return data


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what}: invalid JSON: {e}") from None


def _blob_path(layout: Path, digest: object, what: str) -> Path:
    if not isinstance(digest, str) or ":" not in digest:
        raise InvalidInput(f"{what}: invalid digest {digest!r}")
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise InvalidInput(f"{what}: unsupported or invalid digest {digest!r}")
    return layout / "blobs" / algo / hexpart


def _read_blob(layout: Path, desc: dict[str, Any], what: str) -> tuple[str, bytes]:
    digest = desc.get("digest")
    path = _blob_path(layout, digest, what)
    if not path.is_file():
        raise NotFound(f"{what}: blob {digest} is missing from {layout}")
    data = _read_small(path, what)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise InvalidInput(f"{what}: blob {digest} does not match its digest (got {actual})")
    return cast(str, digest), data


def _pick_platform(manifests: list[Any], what: str) -> dict[str, Any]:
    from cache.platform import host_platform

    host_os, host_arch, _ = host_platform()
    for m in manifests:
        plat = m.get("platform") if isinstance(m, dict) else None
        if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) == (
            host_os,
            host_arch,
        ):
            return cast(dict[str, Any], m)
    raise NotFound(f"{what}: no manifest for platform {host_os}/{host_arch}")


def open_layout(layout: Path, tag: str | None, ref: str) -> Image:
    """The image tagged ``tag`` in an OCI layout (the only image when ``tag`` is None)."""
    if not layout.is_dir():
        raise NotFound(f"{ref}: {layout} is not a directory")
    marker = layout / "oci-layout"
    if not marker.is_file():
        raise InvalidInput(f"{ref}: {layout} is not an OCI image layout (no oci-layout file)")
    index = _json(_read_small(layout / "index.json", ref), f"{layout}/index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise InvalidInput(f"{ref}: {layout}/index.json is not an OCI image index")

    def name(m: Any) -> Any:
        ann = m.get("annotations") if isinstance(m, dict) else None
        return ann.get(_REF_NAME) if isinstance(ann, dict) else None

    if tag is None and len(manifests) == 1 and isinstance(manifests[0], dict):
        desc: dict[str, Any] = manifests[0]
        tag = str(name(desc) or "")
    else:
        tag = tag or "latest"
        tagged = [m for m in manifests if name(m) == tag]
        if not tagged:
            known = sorted(str(name(m)) for m in manifests if name(m))
            raise NotFound(
                f"{ref}: no image tagged {tag!r} in {layout}"
                + (f" (tags: {', '.join(known)})" if known else "")
            )
        desc = tagged[0] if len(tagged) == 1 else _pick_platform(tagged, ref)
    nested: dict[str, Any] | None = None
    nested_digest: str | None = None
    for _ in range(8):
        digest, data = _read_blob(layout, desc, f"{ref} manifest")
        doc = _json(data, f"{ref} manifest {digest}")
        if not isinstance(doc, dict):
            raise InvalidInput(f"{ref}: manifest {digest} is not a JSON object")
        media = desc.get("mediaType") or doc.get("mediaType")
        if media in _INDEXES or (media is None and "manifests" in doc):
            inner = doc.get("manifests")
            if not isinstance(inner, list):
                raise InvalidInput(f"{ref}: index {digest} has no manifests list")
            nested, nested_digest = doc, digest
            desc = _pick_platform(inner, f"{ref} index {digest}")
            continue
        if media is not None and media not in _MANIFESTS:
            raise Unsupported(f"{ref}: manifest media type {media!r} is not supported")
        return _from_manifest(layout, ref, digest, doc, nested, nested_digest)
    raise InvalidInput(f"{ref}: image indexes nested too deeply")


def _from_manifest(
    layout: Path,
    ref: str,
    digest: str,
    manifest: dict[str, Any],
    index: dict[str, Any] | None,
    index_digest: str | None,
) -> Image:
    cdesc = manifest.get("config")
    ldescs = manifest.get("layers")
    if not isinstance(cdesc, dict) or not isinstance(ldescs, list):
        raise InvalidInput(f"{ref}: manifest {digest} lacks config or layers")
    config_digest, config_bytes = _read_blob(layout, cdesc, f"{ref} config")
    config = _json(config_bytes, f"{ref} config {config_digest}")
    if not isinstance(config, dict):
        raise InvalidInput(f"{ref}: config {config_digest} is not a JSON object")
    diff_ids = _diff_ids(config)
    layers: list[Layer] = []
    for i, ld in enumerate(ldescs):
        if not isinstance(ld, dict):
            raise InvalidInput(f"{ref}: layer {i} descriptor is not an object")
        path = _blob_path(layout, ld.get("digest"), f"{ref} layer {i}")
        if not path.is_file():
            raise NotFound(f"{ref}: layer {i} blob {ld.get('digest')} is missing from {layout}")
        layers.append(
            Layer(
                index=i,
                media_type=str(ld.get("mediaType", "")),
                digest=str(ld.get("digest")),
                size=int(ld.get("size", -1)),
                diff_id=diff_ids[i] if i < len(diff_ids) else "",
                opener=_file_opener(path),
            )
        )
    return Image(
        ref=ref,
        kind="oci-layout",
        manifest_digest=digest,
        manifest=manifest,
        config_digest=config_digest,
        config=config,
        layers=tuple(layers),
        index=index,
        index_digest=index_digest,
    )


def _diff_ids(config: dict[str, Any]) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    return [str(d) for d in ids] if isinstance(ids, list) else []


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open(path, "rb")

    return opener


# ---------------------------------------------------------------------------------------------
# docker-archive tars


class _Section(io.RawIOBase):
    """Bytes [offset, offset+size) of a file, read with pread (one open file per section)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._offset + self._pos)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_docker_archive(path: Path, name: str | None, ref: str) -> Image:
    """An image in a ``docker save`` tar (uncompressed: members are read in place)."""
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        raise NotFound(f"{ref}: {path} does not exist") from None
    except PermissionError:
        raise InvalidInput(f"{ref}: {path} is not readable") from None
    except tarfile.ReadError as e:
        raise InvalidInput(
            f"{ref}: {path} is not an uncompressed docker-archive tar or an OCI layout ({e})"
        ) from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isreg()}

        def read(member: str, what: str) -> bytes:
            m = members.get(member)
            if m is None:
                raise InvalidInput(f"{ref}: {what} {member!r} is missing from the archive")
            if m.size > _MAX_METADATA:
                raise InvalidInput(f"{ref}: {what} {member!r} is too large")
            f = tar.extractfile(m)
            assert f is not None
            return f.read()

        if "manifest.json" not in members:
            raise InvalidInput(f"{ref}: {path} is not a docker-archive (no manifest.json)")
        entries = _json(read("manifest.json", "manifest.json"), f"{ref} manifest.json")
        if not isinstance(entries, list) or not entries:
            raise InvalidInput(f"{ref}: manifest.json lists no image")
        entry = _pick_archive_entry(entries, name, ref)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise InvalidInput(f"{ref}: manifest.json entry lacks Config or Layers")
        config_bytes = read(config_name, "config")
        config = _json(config_bytes, f"{ref} config")
        if not isinstance(config, dict):
            raise InvalidInput(f"{ref}: config is not a JSON object")
        diff_ids = _diff_ids(config)
        layers: list[Layer] = []
        for i, lname in enumerate(layer_names):
            m = members.get(str(lname))
            if m is None:
                raise InvalidInput(f"{ref}: layer {lname!r} is missing from the archive")
            layers.append(
                Layer(
                    index=i,
                    media_type=DOCKER_LAYER_TAR,
                    digest="",
                    size=m.size,
                    diff_id=diff_ids[i] if i < len(diff_ids) else "",
                    opener=_section_opener(path, m.offset_data, m.size),
                )
            )
    return Image(
        ref=ref,
        kind="docker-archive",
        manifest_digest=None,
        manifest=None,
        config_digest="sha256:" + hashlib.sha256(config_bytes).hexdigest(),
        config=config,
        layers=tuple(layers),
    )


def _pick_archive_entry(entries: list[Any], name: str | None, ref: str) -> dict[str, Any]:
    if name is None:
        if len(entries) > 1:
            raise InvalidInput(f"{ref}: the archive holds {len(entries)} images; name one")
        if not isinstance(entries[0], dict):
            raise InvalidInput(f"{ref}: invalid manifest.json entry")
        return cast(dict[str, Any], entries[0])
    want = {name, name + ":latest"}
    for e in entries:
        if isinstance(e, dict) and want & set(e.get("RepoTags") or []):
            return cast(dict[str, Any], e)
    raise NotFound(f"{ref}: no image named {name!r} in the archive")


def _section_opener(path: Path, offset: int, size: int) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return cast(BinaryIO, io.BufferedReader(_Section(path, offset, size), _CHUNK))

    return opener


# ---------------------------------------------------------------------------------------------
# Layer members


def _plain(stack: contextlib.ExitStack, raw: BinaryIO) -> BinaryIO:
    """The uncompressed stream of a layer blob, recognised by its first bytes."""
    buffered = io.BufferedReader(cast(Any, raw), _CHUNK) if not hasattr(raw, "peek") else raw
    head = cast(Any, buffered).peek(4)[:4]
    if head[:2] == b"\x1f\x8b":
        from isal import igzip

        return cast(BinaryIO, stack.enter_context(igzip.GzipFile(fileobj=buffered, mode="rb")))  # type: ignore[no-untyped-call]
    if head == b"\x28\xb5\x2f\xfd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(
            buffered, read_across_frames=True, closefd=False
        )
        return cast(BinaryIO, stack.enter_context(reader))
    return buffered


def iter_members(layer: Layer, what: str = "") -> Iterator[Member]:
    """Stream ``layer``'s tar members in order, each regular file's content hashed (blake3)."""
    import zlib

    where = what or f"layer {layer.index}"
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(layer.opener())
            plain = _plain(stack, raw)
            yield from scan(plain)
    except FileNotFoundError as e:
        raise NotFound(f"{where}: blob {layer.digest or layer.diff_id} is missing ({e})") from None
    except (EOFError, zlib.error, OSError) as e:
        raise InvalidInput(f"{where}: cannot read the layer tar: {e}") from None
    except (InvalidInput, Unsupported) as e:
        raise type(e)(f"{where}: {e.message}") from None
    except Exception as e:
        from cache.layers.compress import decode_errors

        if isinstance(e, decode_errors()):  # IsalError, ZstdError: no OSError
            raise InvalidInput(f"{where}: cannot read the layer tar: {e}") from None
        raise
