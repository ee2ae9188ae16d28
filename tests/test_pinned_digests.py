"""The same Dockerfile and context give the same image digest, commit after commit.

A restructuring must not change a byte of any image; a fidelity fix may, on purpose. Update a
pinned digest only in a commit that says which fix changed it, and add a line to its history.

History of ``APP_DIGEST`` (fixtures/build/app, ``--compression none``, no SOURCE_DATE_EPOCH):
- sha256:613e9a08…77f38 up to and including the restructure (475e93f: the same digest before
  and after the move);
- sha256:e1189c70…a57f6 since 032dcd6 (issue 9 item 1: the WORKDIR layer carries its existing
  parent directory /app with the metadata it already has, as BuildKit's differ does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.util import lbuild, manifest_digest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "build" / "app"
APP_DIGEST = "sha256:e1189c70b0a2c8b4ed38d9c5a358a3249e52aa5772c53f9a74479093a17a57f6"


def test_the_app_fixture_keeps_its_digest(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    shutil.copytree(FIXTURE, ctx)
    out = tmp_path / "out"
    # tests.util.lbuild runs without SOURCE_DATE_EPOCH
    lbuild("build", ctx, "--compression", "none", "--output", f"type=oci,dest={out}",
           home=tmp_path / "home")
    assert manifest_digest(out) == APP_DIGEST
