"""``RUN --mount=...`` values as typed, frozen mounts (BuildKit's commands_runmount.go rules).

The parser checks every mount when it reads the Dockerfile (so a bad mount is a file:line
error before anything is planned); the planner (bind mounts from the context enter the step
key) and the RUN step (what to mount) read the same typed value, and planning never imports
RUN execution.
"""

from __future__ import annotations

from dataclasses import dataclass

from cache.errors import InvalidInput

MOUNT_TYPES = ("bind", "cache", "tmpfs", "secret")


@dataclass(frozen=True)
class RunMount:
    """One ``--mount``: its type and the fields BuildKit knows (aliases folded)."""

    type: str
    target: str = ""
    source: str = ""
    from_: str = ""
    id: str = ""
    readonly: bool = False
    readwrite: bool = False
    required: bool = False
    raw: str = ""


def _truthy(v: str | None) -> bool:
    return v is not None and v.lower() in ("", "true", "1")


def parse_mount(raw: str, file: str, line: int) -> RunMount:
    """Parse one ``--mount`` value; InvalidInput (exit 2) with file:line when it is not valid."""
    fields: dict[str, str] = {}
    for part in raw.split(","):
        k, sep, v = part.partition("=")
        k = k.strip().lower()
        if k in ("ro", "readonly", "rw", "readwrite") and not sep:
            v = "true"
        fields[k] = v
    fields.setdefault("type", "bind")
    typ = fields["type"]
    if typ == "ssh":
        raise InvalidInput("RUN --mount=type=ssh is not supported", file=file, line=line)
    if typ not in MOUNT_TYPES:
        raise InvalidInput(f"unsupported mount type {typ!r}", file=file, line=line)
    for alias in ("dst", "destination"):
        if alias in fields:
            fields["target"] = fields.pop(alias)
    if "src" in fields:
        fields["source"] = fields.pop("src")
    if typ != "secret" and not fields.get("target"):
        raise InvalidInput(f"--mount={raw}: target is required", file=file, line=line)
    return RunMount(
        type=typ,
        target=fields.get("target", ""),
        source=fields.get("source", ""),
        from_=fields.get("from", ""),
        id=fields.get("id", ""),
        readonly=_truthy(fields.get("ro")) or _truthy(fields.get("readonly")),
        readwrite=_truthy(fields.get("rw")) or _truthy(fields.get("readwrite")),
        required=_truthy(fields.get("required")),
        raw=raw,
    )
