"""``--label`` and ``--annotation`` on a built image: the labels join the config's (as
``docker build --label`` does), the annotations go on the manifest (buildx's default
target).  A new config and manifest are written to the content store; layers are shared."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from builder.export.oci import Image, make_image
from builder.plan.keys import canonical as canonical_json

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore


def decorate(
    store: BlobStore, image: Image, labels: Mapping[str, str], annotations: Mapping[str, str]
) -> Image:
    """``image`` with ``labels`` and ``annotations`` (the image itself when both are empty)."""
    if not labels and not annotations:
        return image
    if labels:
        config = json.loads(image.config)
        inner = dict(config.get("config") or {})
        inner["Labels"] = {**(inner.get("Labels") or {}), **labels}
        config["config"] = inner
        image = make_image(store, config, image.layers)
    if not annotations:
        return image
    manifest = json.loads(image.manifest)
    manifest["annotations"] = {**(manifest.get("annotations") or {}), **annotations}
    data = canonical_json(manifest)
    return dataclasses.replace(image, manifest_digest=store.put(data), manifest=data)
