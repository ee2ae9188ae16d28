"""The solver's step cache over the index: lookups, records of built steps and of layers by
content, hits remembered and flushed in one transaction, compressed forms of layers."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from builder.plan.keys import LAYER_OP
from cache.types import Compression, Digest

if TYPE_CHECKING:
    from builder.plan.dag import Step
    from builder.solve.solver import CacheHit
    from cache.index.records import Site
    from cache.session import Session
    from cache.types import LayerInfo, StepKey


def _layer_site() -> Site:
    from cache.index.records import Site

    return Site("", "", -1)


class IndexCache:
    """The solver's StepCache over the SQLAlchemy index."""

    def __init__(self, session: Session, dockerfile_id: str) -> None:
        self.session = session
        self.dockerfile_id = dockerfile_id
        self.touched: list[tuple[StepKey, Site]] = []

    def _hit(self, key: StepKey) -> CacheHit | None:
        from builder.solve.solver import CacheHit

        rec = self.session.index.get_step(key)
        if rec is None:
            return None
        if rec.diff_id is not None and not self.session.store.has(rec.diff_id):
            return None  # a record whose blob is gone is a miss, never served
        return CacheHit(rec.diff_id, rec.toc_digest, rec.layer_size)

    def _put(
        self,
        key: StepKey,
        layer: LayerInfo | None,
        toc_digest: Digest | None,
        inputs: dict[str, Any],
        site: Site,
        seconds: float,
    ) -> None:
        from cache.index.records import StepRecord

        now = time.time()
        self.session.index.put_step(
            StepRecord(
                key=key,
                diff_id=layer.diff_id if layer else None,
                layer_size=layer.size if layer else 0,
                toc_digest=toc_digest if layer else None,
                config_delta="{}",
                inputs=json.dumps(inputs, sort_keys=True),
                dockerfile_id=site.dockerfile_id,
                stage=site.stage,
                position=site.position,
                created=now,
                last_used=now,
                hits=0,
                build_seconds=seconds,
            )
        )

    def _site(self, step: Step) -> Site:
        from cache.index.records import Site

        return Site(self.dockerfile_id, str(step.stage), step.pos)

    def lookup(self, key: StepKey) -> CacheHit | None:
        return self._hit(key)

    def used(self, step: Step) -> None:
        """Remember a hit, to bump its last-used time and site after the build."""
        self.touched.append((step.key, self._site(step)))

    def record(
        self, step: Step, layer: LayerInfo | None, seconds: float, toc_digest: Digest | None
    ) -> None:
        self._put(step.key, layer, toc_digest, step.inputs, self._site(step), seconds)

    def layer_for(self, content_key: StepKey) -> CacheHit | None:
        """The layer written before from the same entries (a *layer record*: see
        ``Solver.write``), or None; never one whose blob is gone."""
        hit = self._hit(content_key)
        if hit is None or hit.diff_id is None:
            return None
        self.touched.append((content_key, _layer_site()))
        return hit

    def remember_layer(
        self, content_key: StepKey, layer: LayerInfo, toc_digest: Digest | None
    ) -> None:
        """Record a layer under its content key (a step record at no Dockerfile site)."""
        self._put(content_key, layer, toc_digest, {"op": LAYER_OP}, _layer_site(), 0.0)

    def flush(self) -> None:
        """Write the hits of this build (last used, hit count, site) in one transaction."""
        if self.touched:
            self.session.index.touch_steps(
                [k for k, _ in self.touched], time.time(), sites=[s for _, s in self.touched]
            )
            self.touched.clear()


def compressed_blob(session: Session, diff_id: Digest, codec: Compression) -> Any:
    """The compressed blob of a layer, compressing only on a cache miss."""
    from cache.layers.tar import (
        GZIP_DEFAULT_LEVEL,
        ZSTD_DEFAULT_LEVEL,
        codec_version,
        compress_layer,
    )

    level = {"gzip": GZIP_DEFAULT_LEVEL, "zstd": ZSTD_DEFAULT_LEVEL}.get(codec, 0)
    version = codec_version(codec)
    found = session.index.get_compressed(diff_id, codec, level, version)
    if found is not None and session.store.has(found.digest):
        return found
    blob = compress_layer(session.store, diff_id, codec, level)
    session.index.put_compressed(diff_id, codec, level, version, blob)
    return blob

