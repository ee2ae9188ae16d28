"""Session fixtures of the conformance suite: one base image, buildah store and lbuild home per
pytest process (each xdist worker gets its own, under its own temp directory)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from harness import Buildah, Env, make_base_layout, read_image, sweep_stale_stores

MISSING = [t for t in ("buildah", "skopeo", "umoci") if shutil.which(t) is None]


@pytest.fixture(scope="session")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if MISSING:
        pytest.skip(f"the conformance suite's peer tools are not installed: {', '.join(MISSING)} "
                    "(.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("buildah --isolation chroot with overlay storage and lbuild RUN as root: "
                    "the suite runs as root (as CI does)")
    sweep_stale_stores()
    root = tmp_path_factory.mktemp("conformance")
    base = make_base_layout(root / "base")
    peer_base = make_base_layout(root / "base-buildah", explicit_parents=True)
    img = read_image(base)
    buildah = Buildah(root / "buildah", peer_base)
    try:
        yield Env(base=base, base_paths=set(img.tree), n_base=img.n_layers, buildah=buildah,
                  home=root / "lbuild-home")
    finally:
        buildah.close()
