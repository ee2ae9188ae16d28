"""The README's first command builds the example; the image runs under runc and says hello."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.util import ROOT, tool, umoci_unpack, validate_layout


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_first_lines_are_the_two_commands() -> None:
    setup, tests = _readme_commands()[:2]
    assert "fixtures/example/build.sh" in setup and setup.startswith("pip install")
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be what .ci/run runs"


@pytest.mark.slow
def test_readme_example_builds_and_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, LBUILD_HOME=str(tmp_path / "home"), LBUILD=f"{sys.executable} -m builder")
    env.pop("SOURCE_DATE_EPOCH", None)
    p = subprocess.run([str(ROOT / "fixtures/example/build.sh"), str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    cfg = validate_layout(out)
    assert cfg["config"]["User"] == "app" and cfg["config"]["WorkingDir"] == "/app/data"
    rootfs = umoci_unpack(out, tmp_path / "bundle")
    assert (rootfs / "static" / "MANIFEST").exists() is False  # the assets stage's rootfs is not ours
    assert (rootfs / "app/static/MANIFEST").read_text().split() == [
        "/static/css/site.css", "/static/index.html"]
    assert (rootfs / "app/data").stat().st_uid == 1000
    config_path = tmp_path / "bundle" / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["terminal"] = False
    config_path.write_text(json.dumps(config))
    cid = f"lbuild-readme-{uuid.uuid4().hex[:8]}"
    run = tool("runc", "run", "-b", tmp_path / "bundle", cid)
    assert run.stdout.strip() == "hello from lbuild (built for hello)"
