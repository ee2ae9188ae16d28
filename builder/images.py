"""Where the images FROM and ``COPY --from`` name come from: ``--build-context`` OCI layouts,
then lbuild's local tags, then registries (builder/pull.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from builder.options import full_tag, oci_layout_ref
from cache.errors import InvalidInput, LbuildError, NotFound, Unsupported
from cache.types import Digest

if TYPE_CHECKING:
    from builder.plan.dag import ExternalImage
    from cache.session import Session
    from cache.store.blobs import BlobStore
    from cache.types import BlobInfo


def image_from_store(store: BlobStore, ref: str, manifest_digest: Digest) -> ExternalImage:
    """An image whose manifest and blobs are all in the content store."""
    from builder.plan.dag import ExternalImage
    from cache.types import BlobInfo

    manifest = json.loads(store.read(manifest_digest))
    config = json.loads(store.read(Digest(manifest["config"]["digest"])))
    layers = tuple(
        BlobInfo(Digest(x["digest"]), int(x["size"]), x["mediaType"])
        for x in manifest.get("layers", [])
    )
    diff_ids = tuple(Digest(d) for d in config.get("rootfs", {}).get("diff_ids", []))
    for b, diff_id in zip(layers, diff_ids, strict=True):
        if not store.has(b.digest) and not _recompress(store, b, diff_id):
            raise NotFound(
                f"image {ref}: layer blob {b.digest} is missing from the store",
                hint=f"rebuild {ref}",
            )
    return ExternalImage(ref, manifest_digest, config, layers, diff_ids)


def _recompress(store: BlobStore, blob: BlobInfo, diff_id: Digest) -> bool:
    """Make a missing compressed layer again from its uncompressed tar (same codec, same bytes)."""
    from cache.layers.tar import codec_of, compress_layer

    if not store.has(diff_id):
        return False
    try:
        again = compress_layer(store, diff_id, codec_of(blob.media_type))
    except LbuildError:
        return False
    # Another codec version gives other bytes: not the blob the manifest names (the extra
    # blob is left for the next prune).
    return again.digest == blob.digest


def make_resolver(
    session: Session,
    build_contexts: Mapping[str, str],
    used: dict[str, str] | None = None,
    *,
    pull: bool = False,
    offline: bool = False,
    transfer: Callable[[str, str, int, int], None] | None = None,
) -> Callable[[str], ExternalImage | None]:
    """Resolve a FROM / COPY --from name: --build-context first, then lbuild's local tags,
    then a registry (builder.pull: a tag is pulled once and remembered as a local tag;
    ``pull`` asks the registry again, ``offline`` never asks it).

    Local tags resolved are noted in ``used`` (name -> manifest digest) for the no-op memo.
    """
    from builder.export.oci import load_oci_layout

    loaded: dict[str, ExternalImage] = {}

    def resolve(ref: str) -> ExternalImage | None:
        if ref in loaded:
            return loaded[ref]
        spec = build_contexts.get(ref)
        img: ExternalImage | None = None
        if spec is not None:
            layout = oci_layout_ref(spec)
            if layout is None:
                raise Unsupported(f"--build-context {ref}={spec}: only oci-layout:// is supported")
            path, tag = layout
            if not (Path(path) / "index.json").is_file():
                raise NotFound(
                    f"--build-context {ref}: {path} is not an OCI layout (no index.json)"
                )
            image, layers = load_oci_layout(session.store, Path(path), tag, tocs=False)
            from cache.layers.toc import remember_layer_tocs

            remember_layer_tocs(session.store, layers)  # the layers imported just now
            from builder.plan.dag import ExternalImage

            config = json.loads(image.config)
            img = ExternalImage(
                ref, image.manifest_digest, config, tuple(image.layers), tuple(image.diff_ids)
            )
        else:
            try:
                name = full_tag(ref)
            except InvalidInput:
                name = ""
            found = session.index.get_tag(name) if name and "@" not in ref else None
            if found is not None and not (pull and '"source"' in found.meta_json):
                img = image_from_store(session.store, name, found.manifest_digest)
                if used is not None:
                    used[name] = found.manifest_digest
            else:  # not built here, or pulled and --pull asks the registry again
                from builder.pull import resolve_remote

                digest = resolve_remote(
                    session, ref, refresh=pull, offline=offline, used=used, transfer=transfer
                )
                img = image_from_store(session.store, ref, digest)
        if img is not None:
            loaded[ref] = img
        return img

    return resolve

