"""Every build that plans and solves leaves one row in the index's ``builds`` table."""

from __future__ import annotations

from pathlib import Path

from cache.index.records import Index
from tests.util import lbuild, manifest_digest, write_files


def test_each_build_is_recorded_with_its_digest_and_step_counts(tmp_path: Path) -> None:
    ctx, home, out = tmp_path / "ctx", tmp_path / "home", tmp_path / "out"
    write_files(ctx, {"Dockerfile": "FROM scratch AS app\nCOPY a /a\nCOPY b /b\n", "a": "1", "b": "2"})
    lbuild("build", ctx, "--output", f"type=oci,dest={out}", home=home)
    first = manifest_digest(out)
    (ctx / "b").write_text("22")
    lbuild("build", ctx, "--output", f"type=oci,dest={out}", home=home)
    second = manifest_digest(out)
    with Index.open(str(home / "lbuild.db")) as index:
        builds = index.list_builds()
    # most recent first: the edit rebuilt only COPY b (COPY a hit)
    assert [(b.target, b.manifest_digest, b.steps_hit, b.steps_missed) for b in builds] == [
        ("app", second, 1, 1),
        ("app", first, 0, 2),
    ]
    assert all(b.seconds > 0 and b.started > 0 for b in builds)
