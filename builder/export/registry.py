"""Push a built or stored image to registries: ``--output type=registry``, ``--push``,
``lbuild push``.

The manifest pushed is the store's bytes, so its digest is the one ``--output type=oci``
writes for the same build.  Blobs that came from another repository of the target's
registry (a pulled base image: its local tag remembers its source) are mounted, not sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from cache.types import Digest

if TYPE_CHECKING:
    from cache.registry.progress import Transfer
    from cache.session import Session


def mount_sources(session: Session, tag_names: Iterable[str] | None = None) -> dict[str, str]:
    """blob digest -> the repository (``domain/path``) it was pulled from, for the images of
    ``tag_names`` (every local tag when None)."""
    if tag_names is None:
        records = list(session.full_index.list_tags())
    else:
        records = [r for r in map(session.index.get_tag, tag_names) if r is not None]
    out: dict[str, str] = {}
    for rec in records:
        try:
            source = json.loads(rec.meta_json or "{}").get("source")
        except ValueError:
            continue
        if not source or not session.store.has(rec.manifest_digest):
            continue
        manifest = json.loads(session.store.read(rec.manifest_digest))
        for d in [manifest.get("config") or {}, *(manifest.get("layers") or [])]:
            if isinstance(d, dict) and isinstance(d.get("digest"), str):
                out.setdefault(d["digest"], str(source))
    return out


def push_image(
    session: Session,
    manifest_digest: Digest,
    names: Sequence[str],
    *,
    transfer: Transfer | None = None,
    sources: Iterable[str] | None = None,
    shared: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Push image ``manifest_digest`` to every reference in ``names``; ``REF@DIGEST`` each.

    ``sources``: the local tags of the images it was built on (their pulled-from
    repositories are mount candidates); None looks at every local tag.  ``shared``: blobs a
    ``--cache-from`` registry has (digest -> repository), mounted the same way, so a build
    that only hit its cache sends and downloads none of them."""
    from cache.registry.progress import throttled
    from cache.registry.push import push
    from cache.registry.reference import parse

    refs = [parse(n) for n in names]  # every name checked before anything is sent
    mounts = {**(shared or {}), **mount_sources(session, sources)}
    results = push(session.store, manifest_digest, refs, mount_from=mounts,
                   progress=throttled(transfer, "push"))
    return tuple(f"{r.ref.repository}:{r.ref.tag}@{r.digest}" if r.ref.tag
                 else f"{r.ref.repository}@{r.digest}" for r in results)
