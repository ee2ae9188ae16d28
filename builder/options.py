"""What a build takes and gives: ``BuildOptions``, ``Output``, ``BuildResult``, and the parsing of
the command line's values (outputs, NAME=VALUE lists, tags, SOURCE_DATE_EPOCH).

Pure values and parsing, imported by the no-op path before anything heavy: standard library
and :mod:`cache.errors` only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cache.errors import InvalidInput, Unsupported
from cache.types import Compression, Digest

if TYPE_CHECKING:
    from cache.remote.spec import CacheSpec


@dataclass(frozen=True)
class Output:
    """One ``--output``: ``type=oci,dest=DIR``, ``type=docker,dest=FILE`` or
    ``type=registry,name=REF[,name=REF2]`` (``names``; ``dest`` is unused there)."""

    type: str
    dest: Path
    names: tuple[str, ...] = ()
    tar: bool = False  # type=oci: one tar file instead of a layout directory


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``lbuild build`` takes."""

    context: Path
    dockerfile: Path | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    build_contexts: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()
    outputs: tuple[Output, ...] = ()
    home: Path | None = None
    jobs: int = 0
    compression: Compression = "gzip"
    keep_mtime: bool = False
    epoch: int | None = None  # SOURCE_DATE_EPOCH; None reads the environment
    rewrite_timestamp: bool = True  # with SOURCE_DATE_EPOCH, clamp the times of RUN's files
    secrets: Mapping[str, Path] = field(default_factory=dict)
    snapshotter: str | None = None  # overlay | copy | None (automatic)
    labels: Mapping[str, str] = field(default_factory=dict)  # --label: on the image config
    annotations: Mapping[str, str] = field(default_factory=dict)  # --annotation: on the manifest
    cache_from: tuple[CacheSpec, ...] = ()  # --cache-from, consulted in order after the index
    cache_to: tuple[CacheSpec, ...] = ()  # --cache-to: where the step records are exported
    allow: tuple[str, ...] = ()  # entitlements (--allow): network.host
    pull: bool = False  # --pull: resolve remote FROM tags again (one manifest HEAD each)
    push: bool = False  # --push: push every -t tag to its registry
    offline: bool = False  # never touch a registry (lbuild watch without --pull)

    def registry_names(self) -> tuple[str, ...]:
        """Every reference this build pushes to (``type=registry`` outputs, ``--push`` tags)."""
        names = [n for o in self.outputs if o.type == "registry" for n in o.names]
        if self.push:
            names += self.tags
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class BuildResult:
    """A finished build: the image's digests and per-step outcomes."""

    manifest_digest: Digest
    config_digest: Digest
    steps_total: int
    steps_cached: int
    seconds: float
    pushed: tuple[str, ...] = ()  # REF@DIGEST of every push (--push, --output type=registry)


ENTITLEMENTS = ("network.host",)
"""What ``--allow`` grants (BuildKit's names); BuildKit's ``security.insecure`` is not
supported (RUN --security=insecure is not either)."""


def parse_allow(values: Sequence[str]) -> tuple[str, ...]:
    """``--allow ENTITLEMENT`` (repeatable, or comma-separated) -> the sorted set granted."""
    out: set[str] = set()
    for value in values:
        for name in (v.strip() for v in value.split(",")):
            if name == "security.insecure":
                raise Unsupported("--allow security.insecure is not supported yet")
            if name not in ENTITLEMENTS:
                raise InvalidInput(
                    f"invalid --allow {name!r}: unknown entitlement (known: network.host)"
                )
            out.add(name)
    return tuple(sorted(out))


def source_date_epoch(value: int | None) -> int:
    if value is not None:
        return value
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"SOURCE_DATE_EPOCH must be an integer, got {raw!r}") from None


def run_clamp(opts: BuildOptions) -> int | None:
    """The time RUN output is clamped to: SOURCE_DATE_EPOCH when it is set (``--source-date-epoch``,
    ``--build-arg SOURCE_DATE_EPOCH`` or the environment) unless ``--no-rewrite-timestamp``."""
    if not opts.rewrite_timestamp:
        return None
    if opts.epoch is not None or os.environ.get("SOURCE_DATE_EPOCH"):
        return source_date_epoch(opts.epoch)
    return None


def parse_output(spec: str) -> Output:
    """Parse ``type=oci,dest=DIR`` (docker buildx syntax: CSV, so ``"name=a,b"`` works)."""
    import csv

    fields: dict[str, str] = {}
    names: list[str] = []
    for part in next(csv.reader([spec]), []):
        k, sep, v = part.partition("=")
        if not sep:
            raise InvalidInput(f"invalid --output {spec!r}: expected type=oci,dest=PATH")
        if k.strip() == "name":
            names += [n.strip() for n in v.split(",") if n.strip()]
        fields[k.strip()] = v.strip()
    typ = fields.get("type", "")
    known = _OUTPUT_ATTRS.get(typ)
    if known is not None:
        for key in fields:
            if key not in known:
                raise Unsupported(
                    f"--output {spec!r}: attribute {key}= is not supported for type={typ} "
                    f"(lbuild takes {', '.join(sorted(known))})"
                )
    if typ == "registry":
        if not names:
            raise InvalidInput(f"invalid --output {spec!r}: name=REF is required")
        if fields.get("push", "true") != "true":
            raise Unsupported(f"--output {spec!r}: push=false is not supported yet")
        return Output(typ, Path(), tuple(names))
    if typ in ("image", "local", "tar"):
        raise Unsupported(f"--output type={typ} is not supported yet (use type=oci or type=docker)")
    if typ not in ("oci", "docker"):
        raise InvalidInput(f"invalid --output {spec!r}: type must be oci or docker")
    dest = fields.get("dest")
    if not dest:
        raise InvalidInput(f"invalid --output {spec!r}: dest=PATH is required")
    if dest == "-":
        raise Unsupported(f"--output {spec!r}: dest=- (standard output) is not supported yet")
    tar = typ == "docker"
    if typ == "oci":
        # buildx: tar=true (its default) writes a tarball, tar=false a layout directory.
        # lbuild's default is the directory, unless dest ends in .tar (docs/usage.md).
        raw_tar = fields.get("tar", "").lower()
        if raw_tar not in ("", "true", "false"):
            raise InvalidInput(f"invalid --output {spec!r}: tar= must be true or false")
        tar = raw_tar == "true" or (raw_tar == "" and dest.endswith(".tar"))
    return Output(typ, Path(dest), tar=tar)


_OUTPUT_ATTRS: dict[str, frozenset[str]] = {
    "oci": frozenset({"type", "dest", "tar"}),
    "docker": frozenset({"type", "dest"}),
    "registry": frozenset({"type", "name", "push"}),
}
"""The --output attributes lbuild implements, by type; any other is refused (exit 2)."""


def parse_kv(items: Sequence[str], what: str, *, from_env: bool = True) -> dict[str, str]:
    """``NAME=VALUE`` flags; a bare ``NAME`` takes the environment's value (as ``docker build
    --build-arg NAME`` does) when ``from_env``, and is an error otherwise."""
    out: dict[str, str] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not k or (not sep and not from_env):
            raise InvalidInput(f"invalid {what} {it!r}: expected NAME=VALUE")
        if not sep:
            env = os.environ.get(k)
            if env is None:
                continue
            v = env
        out[k] = v
    return out


def oci_layout_ref(spec: str) -> tuple[str, str] | None:
    """``oci-layout://DIR[:TAG]`` -> (DIR, TAG), TAG defaulting to ``latest``; None otherwise."""
    if not spec.startswith("oci-layout://"):
        return None
    path, tag = spec[len("oci-layout://") :], "latest"
    head, sep, tail = path.rpartition(":")
    if sep and "/" not in tail and head:
        path, tag = head, tail
    return path, tag


def split_tag(name: str) -> tuple[str, str]:
    """``repo[:tag]`` -> (repo, tag); the tag defaults to ``latest``."""
    if not name or name != name.strip() or " " in name:
        raise InvalidInput(f"invalid tag {name!r}")
    repo, tag = name, "latest"
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1 :]
    if not repo or not tag:
        raise InvalidInput(f"invalid tag {name!r}")
    return repo.lower(), tag


def full_tag(name: str) -> str:
    repo, tag = split_tag(name)
    return f"{repo}:{tag}"

