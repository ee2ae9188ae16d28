"""Images from registries for FROM / ``COPY --from`` and ``lbuild pull``.

A tag is resolved once and remembered as a local tag named by its normalized reference
(``docker.io/library/alpine:3.20``), pointing at the manifest of this host's platform; later
builds use it without asking the registry (Docker's default).  ``--pull`` asks again with
one manifest HEAD and fetches only when the digest moved; blobs already in the store are
never fetched again.  ``offline`` (``lbuild watch`` without ``--pull``) never touches the
network: an image that is not in the store is an error with a hint.

Each pulled layer is also decompressed into the store (its diff_id blob, checked against the
config), as an ``oci-layout://`` build context is: the solver and RUN work from those.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from cache.errors import DigestMismatch, NotFound
from cache.registry.errors import RegistryError
from cache.registry.progress import Transfer, throttled
from cache.types import Digest

if TYPE_CHECKING:
    from cache.registry.pull import PulledImage
    from cache.registry.reference import Reference
    from cache.session import Session
    from cache.store.blobs import BlobStore

def transfer_for(reporter: Any) -> Transfer | None:
    """The reporter's ``transfer`` method when it has one (progress views and JSON do)."""
    fn = getattr(reporter, "transfer", None)
    return fn if callable(fn) else None


def host_platform() -> tuple[str, str, str]:
    from cache.platform import host_platform as host

    return host()


def import_layers(store: BlobStore, image: PulledImage) -> None:
    """Decompress every layer whose diff_id blob is missing; check it against the config."""
    from cache.layers.tar import import_layer
    from cache.layers.toc import remember_layer_tocs

    config = json.loads(store.read(Digest(image.config.digest)))
    diff_ids = [Digest(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
    if len(diff_ids) != len(image.layers):
        raise DigestMismatch(f"image {image.ref}: config lists {len(diff_ids)} diff_ids for "
                             f"{len(image.layers)} layers", str(len(image.layers)),
                             str(len(diff_ids)))
    for layer, diff_id in zip(image.layers, diff_ids, strict=True):
        if store.has(diff_id):
            continue
        with store.open(Digest(layer.digest)) as f:
            info = import_layer(store, f, layer.media_type)
        if info.diff_id != diff_id:
            raise DigestMismatch(f"image {image.ref}: layer {layer.digest} diff_id",
                                 diff_id, info.diff_id)
        remember_layer_tocs(store, [info])


def pull_into(session: Session, ref: Reference, *, transfer: Transfer | None = None,
              platform: tuple[str, str, str] | None = None) -> PulledImage:
    """Pull ``ref`` (the host's platform by default), import its layers and remember its tag."""
    from cache.registry.pull import format_platform, pull

    want = platform or host_platform()
    pulled = pull(session.store, ref, platform=want, progress=throttled(transfer, "pull"))
    import_layers(session.store, pulled)
    if ref.digest is None:
        meta = {"source": ref.repository, "index": pulled.index_digest,
                "platform": format_platform(want)}
        blobs = [Digest(pulled.manifest_digest), Digest(pulled.config.digest),
                 *(Digest(x.digest) for x in pulled.layers)]
        if pulled.index_digest:
            blobs.append(Digest(pulled.index_digest))
        config = json.loads(session.store.read(Digest(pulled.config.digest)))
        blobs += [Digest(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
        session.index.set_tag(str(ref), Digest(pulled.manifest_digest),
                              json.dumps(meta, sort_keys=True), blobs=blobs)
    return pulled


def resolve_remote(
    session: Session,
    name: str,
    *,
    refresh: bool = False,
    offline: bool = False,
    used: dict[str, str] | None = None,
    transfer: Transfer | None = None,
) -> Digest:
    """The manifest digest of image ``name`` (any reference Docker takes) for FROM /
    ``COPY --from``, with the image's blobs in the store.

    ``LBUILD_OFFLINE=1`` in the environment makes every build offline (hermetic CI)."""
    from cache.registry.reference import parse

    ref = parse(name)
    tag_name = str(ref)
    why_offline = ""
    if os.environ.get("LBUILD_OFFLINE") == "1":
        offline, why_offline = True, "LBUILD_OFFLINE=1"
    elif offline:
        why_offline = "lbuild watch without --pull"
    missing = (f"no such stage, build context or local image, and no registry is asked "
               f"({why_offline})")
    hint = f"lbuild pull {name}, or watch with --pull" if "watch" in why_offline else None
    try:
        return _resolve(session, name, ref, tag_name, refresh, offline, used, transfer,
                        missing, hint)
    except RegistryError as e:
        e.message = f"no such stage, build context or local image, and {e.message}"
        raise


def _resolve(session: Session, name: str, ref: Reference, tag_name: str, refresh: bool,
             offline: bool, used: dict[str, str] | None, transfer: Transfer | None,
             missing: str, hint: str | None) -> Digest:
    from cache.registry.pull import remote_digest

    if ref.digest is None:
        rec = session.index.get_tag(tag_name)
        current: str | None = None
        if rec is not None and refresh and not offline:
            meta = json.loads(rec.meta_json or "{}")
            known = meta.get("index") or rec.manifest_digest
            current = remote_digest(ref)
            if current != known:
                rec = None
        if rec is not None and (offline or _complete(session.store, rec.manifest_digest)):
            if used is not None:
                used[tag_name] = rec.manifest_digest
            return rec.manifest_digest  # offline and incomplete: the caller's error says so
        if offline:
            raise NotFound(missing, hint=hint)
        pulled = pull_into(session, ref, transfer=transfer)
        if used is not None:
            used[tag_name] = pulled.manifest_digest
        return Digest(pulled.manifest_digest)
    if offline and not session.store.has(Digest(ref.digest)):
        raise NotFound(missing, hint=hint)
    pulled = pull_into(session, ref, transfer=transfer)  # no request when all is stored
    return Digest(pulled.manifest_digest)


def _complete(store: BlobStore, manifest_digest: Digest) -> bool:
    """Whether the manifest, its config, its layers and their diff_id blobs are stored."""
    if not store.has(manifest_digest):
        return False
    manifest = json.loads(store.read(manifest_digest))
    config = Digest(manifest["config"]["digest"])
    if not store.has(config):
        return False
    diff_ids = (json.loads(store.read(config)).get("rootfs") or {}).get("diff_ids") or []
    blobs = [Digest(x["digest"]) for x in manifest.get("layers") or []]
    return all(store.has(d) for d in [*blobs, *map(Digest, diff_ids)])
