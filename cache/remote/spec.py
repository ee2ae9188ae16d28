"""``--cache-to`` / ``--cache-from`` values, BuildKit's spelling.

``type=local,dest=DIR`` / ``type=local,src=DIR``; ``type=registry,ref=REF`` (both ways; a bare
``REF`` for ``--cache-from`` means ``type=registry,ref=REF``, as buildx reads it);
``mode=min|max`` and ``ignore-error=true|false`` on ``--cache-to``.  An attribute lbuild does not
implement is exit 2 naming it, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cache.errors import InvalidInput, Unsupported

_KNOWN_BUT_NOT_IMPLEMENTED = {
    "compression", "compression-level", "force-compression", "oci-mediatypes",
    "image-manifest", "tag", "digest", "scope", "url", "blobs_prefix", "manifests_prefix",
}


@dataclass(frozen=True)
class CacheSpec:
    """One cache source or destination."""

    type: Literal["local", "registry"]
    where: str  # a directory (local) or a registry reference (registry)
    mode: Literal["min", "max"] = "min"
    ignore_error: bool = False

    @property
    def path(self) -> Path:
        return Path(self.where)

    def __str__(self) -> str:
        return f"type={self.type},{'ref' if self.type == 'registry' else 'dir'}={self.where}"


def _fields(text: str, flag: str) -> dict[str, str]:
    import csv

    out: dict[str, str] = {}
    for part in next(csv.reader([text])) if text else []:
        k, sep, v = part.partition("=")
        if not sep:
            raise InvalidInput(f"invalid {flag} {text!r}: {part!r} is not KEY=VALUE")
        out[k.strip().lower()] = v.strip()
    return out


def _bool(v: str, flag: str, name: str) -> bool:
    if v.lower() in ("true", "1", ""):
        return True
    if v.lower() in ("false", "0"):
        return False
    raise InvalidInput(f"invalid {flag}: {name}={v!r} (true or false)")


def parse_cache_spec(text: str, *, to: bool) -> CacheSpec:
    """Parse one ``--cache-to`` (``to=True``) or ``--cache-from`` value."""
    flag = "--cache-to" if to else "--cache-from"
    if not to and "=" not in text and text:
        return CacheSpec("registry", text)
    f = _fields(text, flag)
    typ = f.pop("type", "")
    if typ in ("gha", "s3", "azblob", "inline"):
        raise Unsupported(f"{flag} type={typ} is not supported yet (use type=local or type=registry)")
    if typ not in ("local", "registry"):
        raise InvalidInput(f"invalid {flag} {text!r}: type must be local or registry")
    if typ == "local":
        where = f.pop("dest" if to else "src", "")
        if not where:
            raise InvalidInput(f"invalid {flag} {text!r}: {'dest' if to else 'src'}=DIR is required")
    else:
        where = f.pop("ref", "")
        if not where:
            raise InvalidInput(f"invalid {flag} {text!r}: ref=REF is required")
    mode: Literal["min", "max"] = "min"
    ignore = False
    if to:
        m = f.pop("mode", "min")
        if m not in ("min", "max"):
            raise InvalidInput(f"invalid {flag} {text!r}: mode must be min or max")
        mode = "max" if m == "max" else "min"
        ignore = _bool(f.pop("ignore-error", "false"), flag, "ignore-error")
    for k in f:
        if k in _KNOWN_BUT_NOT_IMPLEMENTED:
            raise Unsupported(f"{flag}: attribute {k} is not supported yet")
        raise InvalidInput(f"invalid {flag} {text!r}: unknown attribute {k}")
    kind: Literal["local", "registry"] = "local" if typ == "local" else "registry"
    return CacheSpec(kind, where, mode, ignore)
