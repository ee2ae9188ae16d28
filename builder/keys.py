"""Step keys: blake3 over the canonical JSON of a step's inputs (DESIGN.md "Step keys")."""

from __future__ import annotations

import json
from typing import Any

from cache.types import StepKey

LAYER_FORMAT = 2
"""Version of lbuild's layer writer and key layout: bump it when layer bytes would change."""


def canonical(obj: Any) -> bytes:
    """Sorted-key, whitespace-free JSON: the one encoding keys are computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def with_format(inputs: dict[str, Any]) -> dict[str, Any]:
    """The canonical inputs of a step: ``inputs`` plus the layer format version."""
    return {"format": LAYER_FORMAT, **inputs}


def step_key(inputs: dict[str, Any]) -> StepKey:
    """The key of a step whose canonical inputs are ``inputs`` (the format version is added)."""
    import blake3

    return StepKey(blake3.blake3(canonical(with_format(inputs))).hexdigest())
