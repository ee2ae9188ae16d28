"""``lbuild warm``: build every stage (or the named targets) of each Dockerfile for each
build-arg combination of a matrix, and export one ``mode=max`` cache of everything built.

A CI job runs it nightly; every later job reads the cache with ``--cache-from`` and starts hot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.errors import InvalidInput, LbuildError, NotFound

if TYPE_CHECKING:
    from builder.options import BuildOptions
    from builder.progress import Reporter
    from cache.remote.artifact import Record
    from cache.remote.remote import ExportResult
    from cache.remote.spec import CacheSpec


@dataclass
class WarmBuild:
    """One build of the warm run."""

    dockerfile: str
    target: str
    build_args: dict[str, str]
    steps_total: int = 0
    steps_cached: int = 0
    error: str = ""


@dataclass
class WarmSummary:
    builds: list[WarmBuild] = field(default_factory=list)
    exports: list[ExportResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not b.error for b in self.builds)

    def to_json(self) -> dict[str, Any]:
        return {
            "builds": [
                {
                    "dockerfile": b.dockerfile,
                    "target": b.target,
                    "build_args": b.build_args,
                    "steps": b.steps_total,
                    "built": b.steps_total - b.steps_cached,
                    "reused": b.steps_cached,
                    "error": b.error or None,
                }
                for b in self.builds
            ],
            "steps_built": sum(b.steps_total - b.steps_cached for b in self.builds),
            "steps_reused": sum(b.steps_cached for b in self.builds),
            "exports": [
                {
                    "destination": e.destination,
                    "records": e.records,
                    "blobs_uploaded": e.uploaded,
                    "blobs_present": e.present,
                    "bytes_uploaded": e.bytes_uploaded,
                    "manifest_digest": e.manifest_digest,
                }
                for e in self.exports
            ],
            "ok": self.ok,
        }


def load_matrix(path: Path | None) -> list[dict[str, str]]:
    """A JSON or YAML list of build-arg maps (YAML needs PyYAML; JSON always works)."""
    if path is None:
        return [{}]
    try:
        text = path.read_text()
    except OSError as e:
        raise NotFound(f"--matrix {path}: {e.strerror or e}") from None
    data: Any
    try:
        data = json.loads(text)
    except ValueError:
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError:
            raise InvalidInput(f"--matrix {path}: not JSON (YAML needs PyYAML)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidInput(f"--matrix {path}: not JSON or YAML ({e})") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data) or not data:
        raise InvalidInput(f"--matrix {path}: expected a non-empty list of build-arg maps")
    return [{str(k): str(v) for k, v in x.items()} for x in data]


def stage_names(dockerfile: Path) -> list[str]:
    """Every stage of a Dockerfile, by name (or index when unnamed)."""
    from builder.frontend import dockerfile as df

    parsed = df.load(dockerfile)
    return [s.name or str(s.index) for s in parsed.stages]


def warm(
    base: BuildOptions,
    dockerfiles: Sequence[Path],
    targets: Sequence[str],
    matrix: Sequence[Mapping[str, str]],
    cache_to: Sequence[CacheSpec],
    reporter: Reporter,
    on_build: Callable[[WarmBuild], None] | None = None,
) -> WarmSummary:
    """Build each (Dockerfile, target, matrix entry), then export the union of every step's
    record once to each ``cache_to`` (``mode=max`` whatever the spec says)."""
    from builder.api import build
    from builder.cacheshare import export
    from cache.session import Session

    summary = WarmSummary()
    records: dict[str, Record] = {}
    for dfile in dockerfiles:
        names = list(targets) or stage_names(dfile)
        for args in matrix:
            for target in names:
                wb = WarmBuild(str(dfile), target, dict(args))
                opts = replace(
                    base,
                    dockerfile=dfile,
                    target=target,
                    build_args={**base.build_args, **args},
                    cache_to=(),
                )
                collected: list[Record] = []
                try:
                    result = build(opts, reporter, collect=collected)
                    wb.steps_total, wb.steps_cached = result.steps_total, result.steps_cached
                    for r in collected:
                        records.setdefault(r.key, r)
                except LbuildError as e:
                    wb.error = str(e)
                summary.builds.append(wb)
                if on_build is not None:
                    on_build(wb)
    if summary.ok and records:
        with Session.open(base.home) as session:
            summary.exports = export(
                [replace(s, mode="max") for s in cache_to],
                list(records.values()),
                session,
                None,
                reporter.message,
            )
    return summary
