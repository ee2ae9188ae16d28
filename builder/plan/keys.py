"""Step keys: blake3 over the canonical JSON of a step's inputs (DESIGN.md "Step keys")."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from cache.types import Entry, StepKey

KEY_FORMAT = 3
"""Version of the step-key layout and of what a step makes of its inputs (the entries of its
layer, its config change): bump it when the same inputs would give other entries or another
config.  The bytes the tar writer makes of given entries have their own version,
``cache.layers.tar.TAR_WRITER_VERSION``, which enters layer content keys."""

LAYER_OP = "LAYER"
"""The ``op`` of a *layer record*: a layer filed under its content key (``Solver.write``,
``layer_content_key``), not a step of any Dockerfile."""


def canonical(obj: Any) -> bytes:
    """Sorted-key, whitespace-free JSON: the one encoding keys are computed over."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:  # a non-UTF-8 file name (surrogateescape): escaped, still ASCII
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def with_format(inputs: dict[str, Any]) -> dict[str, Any]:
    """The canonical inputs of a step: ``inputs`` plus the layer format version."""
    return {"format": KEY_FORMAT, **inputs}


def step_key(inputs: dict[str, Any]) -> StepKey:
    """The key of a step whose canonical inputs are ``inputs`` (the format version is added)."""
    return key_of(canonical(with_format(inputs)))


def key_of(canonical_inputs: bytes) -> StepKey:
    """The key of a step whose inputs, with the format version, encode to ``canonical_inputs``
    (``canonical(with_format(inputs))``)."""
    import blake3

    return StepKey(blake3.blake3(canonical_inputs).hexdigest())


def layer_content_key(entries: Iterable[Entry]) -> StepKey | None:
    """A key over what decides a layer's bytes: its entries (minus where content is read
    from) and the writer's format; None when a regular file's content digest is unknown.

    ``write_layer`` is deterministic, so two entry lists with the same key give the same
    layer tar.  Entries are sorted here, so their order does not matter (nor does it to the
    writer).
    """
    import base64

    import blake3

    from cache.layers.tar import TAR_WRITER_VERSION

    rows: list[list[Any]] = []
    for e in entries:
        if e.type == "file" and not e.digest:
            return None
        rows.append(
            [
                e.path, e.type, e.mode, e.uid, e.gid, e.size if e.type == "file" else 0,
                e.digest if e.type == "file" else "", e.link, e.mtime, e.devmajor, e.devminor,
                [[n, base64.b64encode(v).decode("ascii")] for n, v in sorted(e.xattrs)],
            ]
        )  # fmt: skip
    rows.sort(key=lambda r: (r[0], r[1]))
    doc = {
        "format": KEY_FORMAT,
        "writer": TAR_WRITER_VERSION,
        "op": "layer-content",
        "entries": rows,
    }
    return StepKey(blake3.blake3(canonical(doc)).hexdigest())
