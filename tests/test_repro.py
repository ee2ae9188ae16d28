"""``lbuild repro-check`` end to end: the leaky fixture's every non-determinism is named at its
Dockerfile line and file; the fixed fixture is reproducible across homes, paths and clocks;
``--against`` compares with a published image; bad input exits 2 before building anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import run_fixtures
from run_fixtures import needs_root
from util import FIXTURES, lbuild

busybox_home = run_fixtures.busybox_home
pytestmark = [needs_root, pytest.mark.slow]

EPOCH = {"SOURCE_DATE_EPOCH": "1700000000"}


def repro(home: Path, *args: str | Path, env: dict[str, str] | None = None) -> tuple[int, Any]:
    p = lbuild("repro-check", "--home", home, "--format", "json", *args, home=home, check=False,
               env={**EPOCH, **(env or {})})
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def by_line(comparison: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    """Dockerfile line -> {path: changes} of every differing layer."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for layer in comparison["layers"]:
        assert layer["step"] is not None, layer
        out[layer["step"]["line"]] = {f["path"]: f.get("changes", {"status": f["status"]})
                                      for f in layer["files"]}
    return out


def test_leaky_steps_are_each_named(busybox_home: Path, tmp_path: Path) -> None:
    ctx = tmp_path / "leaky"
    shutil.copytree(FIXTURES / "repro" / "leaky", ctx)
    os.chmod(ctx / "umask.txt", 0o644)  # as checked out under umask 0022
    code, out = repro(busybox_home, "--build-arg", "TZ", ctx)
    assert code == 1 and out["reproducible"] is False
    (cmp,) = out["comparisons"]
    first = cmp["first_difference"]
    assert (first["line"], first["instruction"]) == (6, "RUN date > /stamp")
    assert first["file"].endswith("leaky/Dockerfile")
    lines = by_line(cmp)
    assert sorted(lines) == [6, 7, 8, 9, 10, 11, 12]
    assert set(lines[6]) == {"stamp"} and "content" in lines[6]["stamp"]  # the clock (and TZ)
    for line, name in ((7, "ctx-list"), (8, "list"), (9, "rand")):  # read order x2, randomness
        assert set(lines[line]) == {name} and "content" in lines[line][name]
        assert "mode" not in lines[line][name] and "mtime" not in lines[line][name]
    assert lines[10] == {"host": {"content": lines[10]["host"]["content"], "size": [7, 8]}}
    assert "content" in lines[11]["tz"] and lines[11]["tz"]["size"][1] == len("America/Adak\n")
    assert lines[12] == {"umask.txt": {"mode": ["0644", "0664"]}}  # checked out under 0002
    # created/history times come from SOURCE_DATE_EPOCH; the TZ that ENV (line 13) saw differs
    (env,) = cmp["config"]
    assert env["field"].startswith("config.Env[") and env["b"] == "BUILT_TZ=America/Adak"
    assert env["step"]["line"] == 13
    runs = out["runs"]
    assert runs[0]["variations"] == {}
    assert set(runs[1]["variations"]) == {"path", "umask", "mtime", "order", "tz", "locale",
                                         "home", "hostname", "jobs", "snapshotter", "clock"}


def test_fixed_is_reproducible_and_against(busybox_home: Path, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    code, out = repro(busybox_home, "--keep", keep, FIXTURES / "repro" / "fixed")
    assert code == 0 and out["reproducible"] is True, json.dumps(out, indent=1)[:3000]
    (cmp,) = out["comparisons"]
    assert cmp["equal"] and cmp["a"]["manifest"] == cmp["b"]["manifest"]
    # two homes, two checkout paths, two clocks: one digest
    r0, r1 = out["runs"]
    assert r0["context"] != r1["context"] and "clock" in r1["variations"]
    assert "home" in r1["variations"] and "snapshotter" in r1["variations"]
    published = keep / "run-0" / "image"
    assert (published / "index.json").is_file()
    code, out = repro(busybox_home, "--against", f"oci-layout://{published}:latest",
                      "--variations", "path,order,umask,hostname", FIXTURES / "repro" / "fixed")
    assert code == 0 and out["against"].endswith("image:latest") and len(out["runs"]) == 1
    # a build without SOURCE_DATE_EPOCH keeps RUN's real mtimes: not the published image
    p = lbuild("repro-check", "--home", busybox_home, "--against", published, "--variations",
               "none", FIXTURES / "repro" / "fixed", home=busybox_home, check=False)
    assert p.returncode == 1, p.stderr
    assert "first difference: " in p.stdout and "mtime" in p.stdout


def test_bad_input_exits_2_before_building(busybox_home: Path, tmp_path: Path) -> None:
    ctx = FIXTURES / "repro" / "fixed"
    cases = [
        (["--variations", "path,bogus", ctx], "unknown variation 'bogus'"),
        (["--against", tmp_path / "missing", ctx], "no such OCI layout"),
        ([tmp_path / "no-context"], "not a directory"),
        (["--runs", "1", ctx], "at least 2"),
    ]
    for args, message in cases:
        p = lbuild("repro-check", "--home", busybox_home, *args, home=busybox_home, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


def test_source_date_epoch_flags(busybox_home: Path, tmp_path: Path) -> None:
    """--source-date-epoch, --build-arg SOURCE_DATE_EPOCH and --no-rewrite-timestamp; a RUN
    built without SOURCE_DATE_EPOCH is not reused by a build with it (the clamp is in its key)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM busybox:test\nRUN echo hi > /hi\n")

    def build(name: str, *flags: str) -> Path:
        out = tmp_path / name
        lbuild("build", *flags, ctx, "-o", f"type=oci,dest={out}", home=busybox_home)
        return out

    def diff(a: Path, b: Path) -> dict[str, Any]:
        p = lbuild("diff", "--format", "json", a, b, home=busybox_home, check=False)
        assert p.returncode in (0, 1), p.stderr
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    plain = build("plain")
    flag = build("flag", "--source-date-epoch", "100")
    arg = build("arg", "--build-arg", "SOURCE_DATE_EPOCH=100")
    keep = build("keep", "--source-date-epoch", "100", "--no-rewrite-timestamp")
    out = diff(plain, flag)
    fields = {f["field"]: f["b"] for f in out["config"]}
    assert fields == {"created": "1970-01-01T00:01:40Z", "history[3].created": "1970-01-01T00:01:40Z"}
    (layer,) = out["layers"]
    assert layer["files"][0]["path"] == "hi" and layer["files"][0]["changes"]["mtime"][1] == 100
    assert diff(flag, arg)["equal"] is True
    out = diff(flag, keep)
    assert out["config"] == []  # created and history still from SOURCE_DATE_EPOCH
    (layer,) = out["layers"]
    assert layer["files"][0]["changes"]["mtime"][1] > 100  # RUN's own time kept
    p = lbuild("build", "--build-arg", "SOURCE_DATE_EPOCH=soon", ctx, home=busybox_home, check=False)
    assert p.returncode == 2 and "SOURCE_DATE_EPOCH must be an integer" in p.stderr


def test_clock_gate_holds_every_run_step_back(busybox_home: Path, tmp_path: Path) -> None:
    """The builds run together; every RUN step of build 1 starts >= 2 s (wall clock) after the
    same step of build 0 started: checked on the gate's records and on the times the RUN
    commands themselves wrote into the images."""
    keep = tmp_path / "keep"
    code, out = repro(busybox_home, "--keep", keep, "--variations", "clock",
                      FIXTURES / "repro" / "clock")
    assert code == 1
    (cmp,) = out["comparisons"]
    assert {f["path"] for layer in cmp["layers"] for f in layer["files"]} == {"early", "t1", "t2"}
    gate = keep / "gate"
    r0 = {p.name: float(p.read_text()) for p in (gate / "0").iterdir() if p.name != "done"}
    r1 = {p.name: float(p.read_text()) for p in (gate / "1").iterdir() if p.name != "done"}
    assert len(r0) == 3 and set(r1) == set(r0)
    assert all(r1[step] >= r0[step] + 2 for step in r0), (r0, r1)
    stamps = []
    for run in ("run-0", "run-1"):
        files = {m.name: int(m.data) for layer in run_fixtures.image_layers(keep / run / "image")
                 for m in layer.members if m.name in ("early", "t1", "t2")}
        stamps.append(files)
    by_file = dict(zip(("early", "t1", "t2"), sorted(r0, key=r0.__getitem__), strict=True))
    for name, step in by_file.items():  # steps in start order: early, t1, t2 (one chain)
        assert stamps[0][name] >= int(r0[step])  # build 0's command ran after its record
        assert stamps[1][name] >= int(r0[step]) + 2  # build 1's >= 2 s after build 0's step
