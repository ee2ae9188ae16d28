"""The cache artifact: step records as an OCI image manifest of lbuild's own ``artifactType``.

Vocabulary:

- a *record* is one step record as it travels: its key, the layer it made (``diff_id``, the
  compressed blob that carries it, the TOC blob), its canonical inputs (for ``lbuild why``)
  and the compression it was made with;
- the *artifact* is an OCI image manifest whose ``artifactType`` is :data:`ARTIFACT_TYPE`,
  whose config blob holds the records (JSON, versioned), and whose ``layers`` are every
  compressed layer and TOC blob the records name.

Keys are the local index's keys: they hold nothing of the machine, the checkout path or the
user, so an artifact written on a CI runner hits on a laptop.  A records blob of an unknown
version is ignored with a warning (the caller's); nothing here trusts its input: every digest
is validated and every blob is verified when it is fetched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cache.errors import InvalidInput
from cache.types import Digest, StepKey

ARTIFACT_TYPE = "application/vnd.lbuild.cache.v1"
RECORDS_MEDIA_TYPE = "application/vnd.lbuild.cache.records.v1+json"
TOC_MEDIA_TYPE = "application/vnd.lbuild.layer.toc.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RECORDS_VERSION = 1
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Blob:
    """An OCI descriptor's essentials."""

    digest: Digest
    size: int
    media_type: str


@dataclass(frozen=True)
class Record:
    """One step record in transit (see the module docstring)."""

    key: StepKey
    diff_id: Digest | None
    layer: Blob | None  # the compressed layer blob that carries diff_id
    toc: Blob | None
    layer_size: int
    config_delta: str
    inputs: str
    codec: str = ""
    level: int = 0
    codec_version: str = ""

    def blobs(self) -> tuple[Blob, ...]:
        return tuple(b for b in (self.layer, self.toc) if b is not None)


class UnknownVersion(Exception):
    """A records blob written by another version of the format (ignored with a warning)."""


def _digest(value: Any, what: str) -> Digest:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise InvalidInput(f"cache artifact: {what} is not a sha256 digest: {value!r}")
    return Digest(value)


def _blob(value: Any, what: str) -> Blob | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(f"cache artifact: {what} is not a descriptor")
    size = value.get("size")
    if not isinstance(size, int) or size < 0:
        raise InvalidInput(f"cache artifact: {what} has no valid size")
    return Blob(_digest(value.get("digest"), what), size, str(value.get("mediaType", "")))


def _record(raw: Any) -> Record:
    if not isinstance(raw, dict) or not _KEY.match(str(raw.get("key", ""))):
        raise InvalidInput("cache artifact: a record without a valid key")
    diff_id = raw.get("diff_id")
    layer, toc = _blob(raw.get("layer"), "layer"), _blob(raw.get("toc"), "toc")
    if diff_id is not None:
        diff_id = _digest(diff_id, "diff_id")
        if layer is None:
            raise InvalidInput("cache artifact: a record with a diff_id but no layer blob")
    return Record(
        key=StepKey(raw["key"]),
        diff_id=diff_id,
        layer=layer,
        toc=toc,
        layer_size=int(raw.get("layer_size", 0)),
        config_delta=str(raw.get("config_delta", "{}")),
        inputs=str(raw.get("inputs", "{}")),
        codec=str(raw.get("codec", "")),
        level=int(raw.get("level", 0)),
        codec_version=str(raw.get("codec_version", "")),
    )


def dump_records(records: Iterable[Record]) -> bytes:
    """The records blob: canonical JSON, records sorted by key (same records, same bytes)."""

    def enc(r: Record) -> dict[str, Any]:
        d = asdict(r)
        for k in ("layer", "toc"):
            if d[k] is not None:
                b = d[k]
                d[k] = {"mediaType": b["media_type"], "digest": b["digest"], "size": b["size"]}
        return d

    body = {"version": RECORDS_VERSION, "records": [enc(r) for r in sorted(records, key=lambda r: r.key)]}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def load_records(data: bytes) -> list[Record]:
    """Parse a records blob: ``UnknownVersion`` for another format, ``InvalidInput`` when it
    is not one."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cache artifact: the records blob is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("cache artifact: the records blob is not a JSON object")
    if body.get("version") != RECORDS_VERSION:
        raise UnknownVersion(f"cache records version {body.get('version')!r}")
    raw = body.get("records")
    if not isinstance(raw, list):
        raise InvalidInput("cache artifact: no records list")
    return [_record(r) for r in raw]


def manifest_for(records_blob: Blob, blobs: Sequence[Blob]) -> bytes:
    """The artifact's manifest: config = the records, layers = every blob they name (once,
    sorted by digest)."""
    unique = sorted({b.digest: b for b in blobs}.values(), key=lambda b: b.digest)
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": RECORDS_MEDIA_TYPE,
            "digest": records_blob.digest,
            "size": records_blob.size,
        },
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in unique],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def records_descriptor(manifest: bytes) -> Blob:
    """The records blob a manifest names (``InvalidInput`` when it is not lbuild's artifact)."""
    try:
        body = json.loads(manifest)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cache artifact: the manifest is not JSON") from None
    if not isinstance(body, dict) or body.get("artifactType") != ARTIFACT_TYPE:
        raise InvalidInput("not an lbuild cache artifact (artifactType differs)")
    config = body.get("config")
    blob = _blob(config, "records")
    if blob is None or blob.media_type != RECORDS_MEDIA_TYPE:
        raise InvalidInput("cache artifact: the config is not an lbuild records blob")
    return blob
