"""Differential conformance: each case of cases.py built by lbuild and by buildah, whole merged
file trees and configs compared (see README.md for the table of cases and their status)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cases import CASES
from harness import Case, Env, build_lbuild, compare, read_image

pytestmark = pytest.mark.slow


def _params() -> list[object]:
    out: list[object] = []
    for c in CASES:
        # raises=AssertionError: lbuild failing (BuildFailed) or differing; a failing peer
        # (PeerFailed) is never taken for the expected failure.
        marks = ([pytest.mark.xfail(strict=True, raises=AssertionError, reason=c.xfail)]
                 if c.xfail else [])
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
def test_conformance(case: Case, conformance: Env, tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    case.write_context(ctx)
    ours_df, peer_df = tmp_path / "Dockerfile", tmp_path / "Dockerfile.buildah"
    ours_df.write_text(case.dockerfile)
    peer_df.write_text(case.buildah_dockerfile if case.buildah_dockerfile is not None
                       else case.dockerfile)
    peer_out, ours_out = tmp_path / "buildah.oci", tmp_path / "lbuild.oci"
    # Both builders at once: much of each build is waiting (fsync, process start-up).
    with ThreadPoolExecutor(max_workers=1) as pool:
        peer = pool.submit(conformance.buildah.build, ctx, peer_df, peer_out,
                           build_args=case.build_args, target=case.target)
        try:
            build_lbuild(ctx, ours_df, ours_out, home=conformance.home, base=conformance.base,
                         build_args=case.build_args, target=case.target,
                         extra=case.lbuild_args)
        finally:
            peer.result()  # a failing peer is reported first (PeerFailed)
    diffs = compare(read_image(ours_out), read_image(peer_out), n_base=conformance.n_base,
                    patch=case.patch, ignore=case.ignore, config_patch=case.config_patch,
                    base_paths=conformance.base_paths, mtimes=case.mtimes,
                    adjust=case.adjust)
    assert not diffs, f"{case.id} ({case.checks}):\n" + "\n".join(diffs)
