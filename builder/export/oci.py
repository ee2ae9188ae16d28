"""Images out and in: OCI manifests and configs, OCI image layouts, docker-archive tars.

An ``Image`` is a manifest, a config and layer blobs that are all in the ``BlobStore``.
``make_image`` creates one from a config and compressed layers; ``export_oci_layout`` and
``export_docker_archive`` write it where other tools read it; ``load_oci_layout`` brings an
image from any OCI layout (ours, umoci's, skopeo's) into the store, verifying every byte.

Nothing is left half-written: a new layout is built in a temporary directory next to its
destination and renamed into place; an existing layout gets its new blobs first and its
``index.json`` last, by atomic replace; a docker archive is written to ``DEST.tmp`` and
renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from builder.plan.keys import canonical as canonical_json
from cache.errors import DigestMismatch, InvalidInput, NotFound, Unsupported
from cache.layers.tar import import_layer
from cache.platform import host_platform
from cache.store.contract import ContentStore
from cache.types import BlobInfo, Digest, LayerInfo, digest_hex, sha256_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_VERSION = "1.0.0"

_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEXES = (OCI_INDEX, DOCKER_LIST)
_MAX_METADATA = 16 << 20  # manifests, configs and indexes are small; refuse to slurp a layer


@dataclass(frozen=True)
class Image:
    """An image whose manifest, config and layer blobs are in the content store."""

    manifest_digest: Digest
    manifest: bytes
    config_digest: Digest
    config: bytes
    layers: tuple[BlobInfo, ...]
    diff_ids: tuple[Digest, ...]


def make_image(store: ContentStore, config: Mapping[str, Any], layers: Sequence[BlobInfo]) -> Image:
    """Serialise a config and an OCI manifest for ``layers`` and put both in the store.

    ``config`` must hold ``architecture``, ``os`` and ``rootfs`` (``type: layers`` and one
    diff_id per layer, in order); every layer blob must already be in the store.
    """
    diff_ids = _config_diff_ids(config, "image config")
    if len(diff_ids) != len(layers):
        raise InvalidInput(
            f"image config lists {len(diff_ids)} diff_ids but {len(layers)} layers were given"
        )
    for layer in layers:  # present, or fetched from a shared cache when its bytes are needed
        if not store.available(layer.digest):
            raise NotFound(f"layer blob {layer.digest} is not in the store")
    config_bytes = canonical_json(dict(config))
    config_digest = store.put(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config_digest, len(config_bytes)),
        "layers": [_descriptor(x.media_type, x.digest, x.size) for x in layers],
    }
    manifest_bytes = canonical_json(manifest)
    manifest_digest = store.put(manifest_bytes)
    return Image(
        manifest_digest=manifest_digest,
        manifest=manifest_bytes,
        config_digest=config_digest,
        config=config_bytes,
        layers=tuple(layers),
        diff_ids=diff_ids,
    )


def _descriptor(media_type: str, digest: Digest, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def _config_diff_ids(config: Mapping[str, Any], what: str) -> tuple[Digest, ...]:
    """Check the fields the OCI spec requires of a config; return its diff_ids."""
    for key in ("architecture", "os"):
        if not isinstance(config.get(key), str) or not config[key]:
            raise InvalidInput(f"{what}: missing or invalid {key!r}")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, Mapping) or rootfs.get("type") != "layers":
        raise InvalidInput(f"{what}: rootfs must be {{'type': 'layers', 'diff_ids': [...]}}")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list):
        raise InvalidInput(f"{what}: rootfs.diff_ids must be a list")
    return tuple(_parse_digest(d, f"{what}: diff_id") for d in ids)


def _parse_digest(value: object, what: str) -> Digest:
    """A ``sha256:<hex>`` digest from untrusted JSON (it becomes a file name)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what}: digest must be a string, not {value!r}")
    if not value.startswith("sha256:"):
        raise Unsupported(f"{what}: only sha256 digests are supported, not {value!r}")
    try:
        digest_hex(Digest(value))
    except ValueError:
        raise InvalidInput(f"{what}: invalid digest {value!r}") from None
    if value != value.lower():
        raise InvalidInput(f"{what}: invalid digest {value!r}")
    return Digest(value)


def _check_tag(tag: str) -> None:
    if not tag or any(c.isspace() for c in tag):
        raise InvalidInput(f"invalid image tag {tag!r}")


def _platform_of(image: Image) -> dict[str, str]:
    config = json.loads(image.config)
    plat = {"architecture": config["architecture"], "os": config["os"]}
    if isinstance(config.get("variant"), str):
        plat["variant"] = config["variant"]
    return plat


def _image_blobs(store: ContentStore, image: Image) -> list[Digest]:
    blobs = [image.config_digest, *(x.digest for x in image.layers), image.manifest_digest]
    for d in blobs:
        if not store.ensure(d):
            raise NotFound(f"blob {d} of image {image.manifest_digest} is not in the store")
    return blobs


def _is_layout(path: Path) -> bool:
    return (path / "oci-layout").is_file()


def export_oci_layout(store: ContentStore, image: Image, dest: Path, tag: str = "latest") -> None:
    """Write ``image`` as an OCI image layout at ``dest`` under ``tag``.

    A new ``dest`` is built in a temporary directory beside it and renamed into place.  If
    ``dest`` already is a layout, its other images stay; the manifest that had ``tag`` is
    replaced.  Blobs are hardlinked from the store when it is on the same filesystem.

    Exports to one layout from several processes at once are serialised by ``flock``: on the
    layout directory while its ``index.json`` is read, changed and replaced, and on the
    parent directory while a new layout is created (so no tag is lost and no export fails
    because another one created the layout first).
    """
    _check_tag(tag)
    dest = Path(dest)
    blobs = _image_blobs(store, image)
    desc = _descriptor(
        OCI_MANIFEST,
        image.manifest_digest,
        len(image.manifest),
        annotations={REF_NAME: tag},
        platform=_platform_of(image),
    )
    if not _is_layout(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with _dir_lock(dest.parent):
            if not _is_layout(dest):
                _new_layout(store, blobs, desc, dest)
                return
    with _dir_lock(dest):
        _layout_version(dest)
        index = _read_json(dest / "index.json", "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise InvalidInput(f"{dest}/index.json: not an OCI image index")
        for d in blobs:  # blobs first: index.json must never name a missing blob
            _place_blob(store, d, dest / "blobs" / "sha256")
        keep = [m for m in manifests if _ref_name(m) != tag]
        index["manifests"] = [*keep, desc]
        _atomic_write(dest / "index.json", canonical_json(index), 0o644)


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a directory (released when the block ends)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except NotADirectoryError:
        raise InvalidInput(f"{path} exists and is not an OCI image layout") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _new_layout(store: ContentStore, blobs: list[Digest], desc: dict[str, Any], dest: Path) -> None:
    """Create the layout ``dest`` holding one image (its parent directory is locked)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidInput(f"{dest} exists and is not an OCI image layout")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        (tmp / "blobs" / "sha256").mkdir(parents=True)
        for d in blobs:
            _place_blob(store, d, tmp / "blobs" / "sha256")
        _atomic_write(tmp / "oci-layout", canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
        _atomic_write(tmp / "index.json", canonical_json(index), 0o644)
        os.replace(tmp, dest)  # an empty directory at dest is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _ref_name(desc: object) -> object:
    if not isinstance(desc, dict):
        return None
    annotations = desc.get("annotations")
    return annotations.get(REF_NAME) if isinstance(annotations, dict) else None


def _place_blob(store: ContentStore, d: Digest, blobs_dir: Path) -> None:
    """Put blob ``d`` into a layout's blobs dir: hardlink when possible, else copy + rename."""
    target = blobs_dir / digest_hex(d)
    if target.is_file() and target.stat().st_size == store.size(d):
        return
    store.check_out(d)  # a blob that no longer matches its name never leaves the store
    src = store.path(d)
    tmp = blobs_dir / f".{digest_hex(d)}.{uuid.uuid4().hex}.tmp"
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem (EXDEV) or links not allowed: copy instead
            shutil.copyfile(src, tmp)
            os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` all at once (temp file, fsync, rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_docker_archive(
    store: ContentStore, image: Image, dest: Path, repo_tags: Sequence[str]
) -> None:
    """Write ``image`` as a ``docker load`` tar: manifest.json, the config, uncompressed layers.

    A tag without ``:TAG`` gets ``:latest`` (as docker does).  Written to ``DEST.tmp`` and
    renamed into place.
    """
    import tarfile

    tags = [_docker_tag(t) for t in repo_tags]
    dest = Path(dest)
    if dest.is_dir():
        raise InvalidInput(f"docker archive destination {dest} is a directory (name a file)")
    for d in image.diff_ids:
        if not store.ensure(d):
            raise NotFound(
                f"uncompressed layer {d} is not in the store",
                hint="the layer tar named by its diff_id must be in the store",
            )
    config_name = f"{digest_hex(image.config_digest)}.json"
    layer_names = [f"{digest_hex(d)}/layer.tar" for d in image.diff_ids]
    manifest = [{"Config": config_name, "RepoTags": tags, "Layers": layer_names}]
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.type, ti.mtime = size, kind, 0
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return ti

    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            written: set[Digest] = set()
            for d, name in zip(image.diff_ids, layer_names, strict=True):
                if d in written:
                    continue
                written.add(d)
                tar.addfile(info(digest_hex(d), kind=tarfile.DIRTYPE))
                with store.open(d) as f:
                    hashed = _HashingReader(f)
                    tar.addfile(info(name, store.size(d)), hashed)
                    store.vouch(d, hashed.digest())  # verified as it streamed out
            tar.addfile(info(config_name, len(image.config)), io.BytesIO(image.config))
            data = canonical_json(manifest)
            tar.addfile(info("manifest.json", len(data)), io.BytesIO(data))
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_oci_archive(store: ContentStore, image: Image, dest: Path, tag: str = "latest") -> None:
    """Write ``image`` as an OCI image layout in one tar file (buildx's ``type=oci,tar=true``).

    The tar holds ``oci-layout``, ``index.json`` (one manifest, named ``tag``) and
    ``blobs/sha256/*``, with fixed times and owners; it replaces ``dest`` whole (a tar is
    never merged with an earlier one).  Written beside ``dest`` and renamed into place.
    """
    import tarfile

    _check_tag(tag)
    dest = Path(dest)
    if dest.is_dir():
        raise InvalidInput(
            f"--output type=oci,tar=true: destination {dest} is a directory (name a file, "
            "or give tar=false for a layout directory)"
        )
    blobs = _image_blobs(store, image)
    desc = _descriptor(
        OCI_MANIFEST,
        image.manifest_digest,
        len(image.manifest),
        annotations={REF_NAME: tag},
        platform=_platform_of(image),
    )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)

    def info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.type, ti.mtime = size, kind, 0
        ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        return ti

    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            marker = canonical_json({"imageLayoutVersion": LAYOUT_VERSION})
            tar.addfile(info("oci-layout", len(marker)), io.BytesIO(marker))
            data = canonical_json(index)
            tar.addfile(info("index.json", len(data)), io.BytesIO(data))
            tar.addfile(info("blobs", kind=tarfile.DIRTYPE))
            tar.addfile(info("blobs/sha256", kind=tarfile.DIRTYPE))
            for d in sorted(set(blobs)):
                with store.open(d) as f:
                    hashed = _HashingReader(f)
                    tar.addfile(info(f"blobs/sha256/{digest_hex(d)}", store.size(d)), hashed)
                    store.vouch(d, hashed.digest())  # verified as it streamed out
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _HashingReader:
    """A reader that hashes (sha256) what is read through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._h.update(b)
        return b

    def digest(self) -> Digest:
        return sha256_digest(self._h.hexdigest())


def _docker_tag(tag: str) -> str:
    if not tag or any(c.isspace() for c in tag) or tag.startswith(("/", ":")):
        raise InvalidInput(f"invalid repository tag {tag!r}")
    if ":" not in tag.rsplit("/", 1)[-1]:
        return tag + ":latest"
    return tag


# ---------------------------------------------------------------------------------------------
# Loading


def _layout_version(layout: Path) -> None:
    marker = layout / "oci-layout"
    if not marker.is_file():
        raise NotFound(f"{layout} is not an OCI image layout (no oci-layout file)")
    data = _read_json(marker, "oci-layout")
    version = data.get("imageLayoutVersion") if isinstance(data, dict) else None
    if version != LAYOUT_VERSION:
        raise Unsupported(f"{marker}: unsupported imageLayoutVersion {version!r}")


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_METADATA + 1)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    return _parse_json(data, f"{path} ({what})")


def _parse_json(data: bytes, what: str) -> Any:
    if len(data) > _MAX_METADATA:
        raise InvalidInput(f"{what}: too large for a manifest, config or index")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what}: invalid JSON: {e}") from None


def _layout_blob(layout: Path, desc: Mapping[str, Any], what: str) -> tuple[Digest, Path]:
    digest = _parse_digest(desc.get("digest"), what)
    path = layout / "blobs" / "sha256" / digest_hex(digest)
    if not path.is_file():
        raise NotFound(f"{what}: blob {digest} is missing from {layout}")
    size = desc.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidInput(f"{what}: descriptor has no valid size")
    if path.stat().st_size != size:
        raise DigestMismatch(f"{what} {digest} size", str(size), str(path.stat().st_size))
    return digest, path


def _read_small_blob(layout: Path, desc: Mapping[str, Any], what: str) -> tuple[Digest, bytes]:
    """A verified manifest/config/index blob from a layout."""
    digest, path = _layout_blob(layout, desc, what)
    if path.stat().st_size > _MAX_METADATA:
        raise InvalidInput(f"{what}: {digest} is too large for a manifest, config or index")
    data = path.read_bytes()
    actual = sha256_digest(hashlib.sha256(data).hexdigest())
    if actual != digest:
        raise DigestMismatch(f"{what} {path}", digest, actual)
    return digest, data


def _pick_platform(manifests: list[Any], where: str) -> Mapping[str, Any]:
    host_os, host_arch, _variant = host_platform()
    for m in manifests:
        plat = m.get("platform") if isinstance(m, dict) else None
        if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) == (
            host_os,
            host_arch,
        ):
            return dict(m)
    raise NotFound(f"{where}: no manifest for platform {host_os}/{host_arch}")


def load_oci_layout(
    store: ContentStore, layout: Path, tag: str = "latest", *, tocs: bool = True
) -> tuple[Image, tuple[LayerInfo, ...]]:
    """Bring the image tagged ``tag`` in an OCI layout into the store, verifying every blob.

    Follows a nested index to this host's platform.  Each layer is stored compressed as
    found and decompressed into an uncompressed tar blob (its diff_id); a diff_id that does
    not match the config's ``rootfs.diff_ids`` raises ``DigestMismatch``.  Returns the image
    and the uncompressed layers (with TOCs), in order.  With ``tocs=False`` a layer whose
    compressed and uncompressed blobs are both in the store already is not read again (its
    LayerInfo then has an empty TOC): a build that reuses a base image pays nothing for it.
    """
    layout = Path(layout)
    _layout_version(layout)
    index = _read_json(layout / "index.json", "index.json")
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise InvalidInput(f"{layout}/index.json: not an OCI image index")
    tagged = [m for m in manifests if _ref_name(m) == tag]
    if not tagged:
        raise NotFound(f"no image tagged {tag!r} in {layout}")
    desc: Mapping[str, Any] = tagged[0] if len(tagged) == 1 else _pick_platform(tagged, tag)
    for _depth in range(8):
        what = f"{layout}:{tag}"
        digest, data = _read_small_blob(layout, desc, f"{what} manifest")
        doc = _parse_json(data, f"{what} manifest {digest}")
        if not isinstance(doc, dict):
            raise InvalidInput(f"{what}: manifest {digest} is not a JSON object")
        media_type = desc.get("mediaType") or doc.get("mediaType")
        if media_type is None:
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        if media_type in _INDEXES:
            nested = doc.get("manifests")
            if not isinstance(nested, list):
                raise InvalidInput(f"{what}: index {digest} has no manifests list")
            desc = _pick_platform(nested, f"{what} index {digest}")
            continue
        if media_type not in _MANIFESTS:
            raise Unsupported(f"{what}: unsupported manifest media type {media_type!r}")
        return _load_manifest(store, layout, what, digest, data, doc, tocs)
    raise InvalidInput(f"{layout}:{tag}: indexes nested too deeply")


def _load_manifest(
    store: ContentStore,
    layout: Path,
    what: str,
    manifest_digest: Digest,
    manifest_bytes: bytes,
    manifest: dict[str, Any],
    tocs: bool = True,
) -> tuple[Image, tuple[LayerInfo, ...]]:
    config_desc = manifest.get("config")
    layer_descs = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layer_descs, list):
        raise InvalidInput(f"{what}: manifest {manifest_digest} lacks config or layers")
    config_digest, config_bytes = _read_small_blob(layout, config_desc, f"{what} config")
    config = _parse_json(config_bytes, f"{what} config {config_digest}")
    if not isinstance(config, dict):
        raise InvalidInput(f"{what}: config {config_digest} is not a JSON object")
    diff_ids = _config_diff_ids(config, f"{what} config")
    if len(diff_ids) != len(layer_descs):
        raise InvalidInput(
            f"{what}: config lists {len(diff_ids)} diff_ids, manifest {len(layer_descs)} layers"
        )
    blobs: list[BlobInfo] = []
    infos: list[LayerInfo] = []
    for i, (ldesc, diff_id) in enumerate(zip(layer_descs, diff_ids, strict=True)):
        lwhat = f"{what} layer {i}"
        if not isinstance(ldesc, dict) or not isinstance(ldesc.get("mediaType"), str):
            raise InvalidInput(f"{lwhat}: invalid layer descriptor")
        digest, path = _layout_blob(layout, ldesc, lwhat)
        if not store.has(digest):
            try:
                with open(path, "rb") as f:
                    store.put_stream(f, expected=digest)
            except DigestMismatch as e:
                raise DigestMismatch(f"{lwhat} {path}", e.expected, e.actual) from None
        if not tocs and store.has(diff_id):
            info = LayerInfo(diff_id=diff_id, size=store.size(diff_id), toc=())
        else:
            with store.open(digest) as f:
                info = import_layer(store, f, ldesc["mediaType"])
        if info.diff_id != diff_id:
            raise DigestMismatch(f"{lwhat} {digest} diff_id", diff_id, info.diff_id)
        blobs.append(BlobInfo(digest=digest, size=ldesc["size"], media_type=ldesc["mediaType"]))
        infos.append(info)
    store.put(config_bytes)
    store.put(manifest_bytes)
    image = Image(
        manifest_digest=manifest_digest,
        manifest=manifest_bytes,
        config_digest=config_digest,
        config=config_bytes,
        layers=tuple(blobs),
        diff_ids=diff_ids,
    )
    return image, tuple(infos)
