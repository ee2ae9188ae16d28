"""Hardening of the exporters (issue 11): concurrent exports to one OCI layout, verified blobs
on the way out, bad destinations."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from builder.export.oci import export_oci_layout, make_image
from cache.store.blobs import BlobStore

CONFIG = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}


def _export_tags(root: str, dest: str, worker: int, n: int) -> None:
    store = BlobStore(Path(root))
    image = make_image(store, {**CONFIG, "config": {"Labels": {"w": str(worker)}}}, [])
    for i in range(n):
        export_oci_layout(store, image, Path(dest), f"w{worker}-{i}")


def test_concurrent_exports_to_one_layout_keep_every_tag(tmp_path: Path) -> None:
    """Item 13: index.json is read, changed and replaced under a lock, so no tag is lost."""
    dest = tmp_path / "layout"
    workers, per_worker = 4, 25
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_export_tags, args=(str(tmp_path / "store"), str(dest), w, per_worker))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * workers
    index = json.loads((dest / "index.json").read_text())
    tags = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert tags == sorted(f"w{w}-{i}" for w in range(workers) for i in range(per_worker))
    assert sorted(p.name for p in dest.iterdir()) == ["blobs", "index.json", "oci-layout"]
