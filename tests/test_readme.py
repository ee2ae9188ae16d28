"""The README's two commands: the first sets up a fresh venv and builds the example (which then
runs under runc and says hello), the second is exactly what .ci/run runs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.util import ROOT, tool, umoci_unpack, validate_layout


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("   #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_first_lines_are_the_two_commands() -> None:
    setup, tests = _readme_commands()[:2]
    assert "python3 -m venv .venv" in setup and ". .venv/bin/activate" in setup
    assert "pip install ." in setup and "[test]" not in setup  # the tool, not the test extras
    assert "busybox-static" in setup and "python3-venv" in setup
    assert setup.endswith("fixtures/example/build.sh out/example")
    assert "'.[test]'" in tests and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be what .ci/run runs"


def _copy_checkout(dest: Path) -> None:
    """The files a fresh clone would have (tracked, plus new files not ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file() or "__pycache__" in rel:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _without_apt(command: str) -> str:
    """The first command minus its apt-get step when every package it names is installed
    (a test must not change the machine); skip the test when one is missing."""
    parts = [p.strip() for p in command.split("&&")]
    apt = [p for p in parts if "apt-get install" in p]
    for part in apt:
        pkgs = [w for w in shlex.split(part) if not w.startswith("-")][3:]
        missing = [
            p for p in pkgs
            if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
        ]
        if missing:
            pytest.skip(f"not installed here: {' '.join(missing)}")
    return " && ".join(p for p in parts if p not in apt)


def _offline(command: str) -> str:
    """The command with its venv seeing this machine's packages and pip building lbuild with
    them: no download.  ``LBUILD_README_FRESH=1`` runs it as written instead (a truly fresh
    venv whose dependencies come from the package index: 86 s here, most of it downloads)."""
    if os.environ.get("LBUILD_README_FRESH") == "1":
        return command
    for old, new in (
        ("python3 -m venv .venv", "python3 -m venv --system-site-packages .venv"),
        ("pip install .", "pip install --no-build-isolation ."),
    ):
        assert old in command
        command = command.replace(old, new)
    return command


@pytest.mark.slow
def test_readme_first_command_on_a_fresh_venv(tmp_path: Path) -> None:
    """A checkout, a new venv, ``pip install .`` (a real, non-editable install: every
    subpackage must be in it), the example built by the venv's ``lbuild``."""
    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian machine")
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    setup = _offline(_without_apt(_readme_commands()[0]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(LBUILD_HOME=str(tmp_path / "home"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("SOURCE_DATE_EPOCH", None)
    env.pop("LBUILD", None)
    p = subprocess.run(["sh", "-ec", setup], cwd=checkout, env=env, capture_output=True,
                       text=True, timeout=540)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    venv_python = checkout / ".venv/bin/python"
    # the venv runs its own installed copy, not the checkout's sources
    where = subprocess.run(
        [str(venv_python), "-c", "import builder.frontend.dockerfile, cache.index.records, "
         "lbuild; print(builder.__file__)"],
        cwd="/", capture_output=True, text=True, env=env,
    )
    assert where.returncode == 0, where.stderr
    assert "/.venv/lib/" in where.stdout
    out = checkout / "out/example"
    cfg = validate_layout(out)
    assert cfg["config"]["User"] == "app" and cfg["config"]["WorkingDir"] == "/app/data"
    rootfs = umoci_unpack(out, tmp_path / "bundle")
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
