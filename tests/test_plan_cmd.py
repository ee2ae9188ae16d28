"""Tests for ``lbuild plan``: HIT/MISS per step, formats, and golden plan fixtures.

Golden cases live in fixtures/plan/<case>/: a ``Dockerfile``, its context files, an optional
``args.json`` (extra command-line arguments, e.g. ``--target``) and ``graph.json``: the plan
in a stable shape (step names, kinds, link flags, status on an empty cache, dependency
names; no keys or ids). ``LBUILD_REGEN=1`` rewrites graph.json; review every diff by hand.
Negative cases live in fixtures/plan-negative/<case>/ with the exact error line in error.txt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from util import FIXTURES, lbuild, write_files

POSITIVE = sorted(p for p in (FIXTURES / "plan").iterdir() if p.is_dir())
NEGATIVE = sorted(p for p in (FIXTURES / "plan-negative").iterdir() if p.is_dir())


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run the real command line in this process (the plan path imports the same modules)."""
    from builder.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def plan_json(capsys: pytest.CaptureFixture[str], ctx: Path, home: Path, *args: str) -> list[Any]:
    code, out, err = cli(capsys, "plan", ctx, "--format", "json", "--home", home, *args)
    assert code == 0, err
    steps: list[Any] = json.loads(out)["steps"]
    return steps


def by_name(steps: list[Any]) -> dict[str, Any]:
    return {s["name"]: s for s in steps}


def misses(steps: list[Any]) -> set[str]:
    return {s["name"] for s in steps if s["status"] == "MISS"}


def blob_files(home: Path) -> set[str]:
    d = home / "blobs" / "sha256"
    return {p.name for p in d.iterdir()} if d.exists() else set()


def build(ctx: Path, home: Path, *args: str) -> None:
    lbuild("build", ctx, "--progress", "plain", *args, home=home)


DOCKERFILE = """\
FROM scratch AS assets
COPY assets/ /assets

FROM scratch AS unused
COPY unused.txt /unused

FROM scratch
COPY early/ /early
COPY --link big.txt /big
ENV A=1
COPY --from=assets /assets /srv
COPY late.txt /late
"""

FILES: dict[str, str | bytes] = {
    "Dockerfile": DOCKERFILE,
    "assets/a.css": "body{}\n",
    "unused.txt": "u\n",
    "early/x.txt": "x\n",
    "big.txt": "big\n",
    "late.txt": "late\n",
}

ASSETS = "[assets 1/1] COPY assets/ /assets"
EARLY = "[stage-2 1/5] COPY early/ /early"
LINK = "[stage-2 2/5] COPY --link big.txt /big"
ENV = "[stage-2 3/5] ENV A=1"
FROM_ASSETS = "[stage-2 4/5] COPY --from=assets /assets /srv"
LATE = "[stage-2 5/5] COPY late.txt /late"
BASES = {"[assets] FROM scratch", "[stage-2] FROM scratch"}


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    c = tmp_path / "ctx"
    write_files(c, FILES)
    return c


def test_json_shape_and_deps(ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = plan_json(capsys, ctx, home)
    names = [s["name"] for s in steps]
    # the unused stage is pruned; every other instruction and each base is a step
    assert sorted(names) == sorted([*BASES, ASSETS, EARLY, LINK, ENV, FROM_ASSETS, LATE])
    assert not any("unused" in n for n in names)
    for s in steps:
        assert set(s) == {"id", "name", "kind", "key", "status", "link", "deps", "source"}
        assert s["source"] is None  # no --cache-from: every hit is the local index's
        assert re.fullmatch(r"[0-9a-f]{64}", s["key"]), s
        # listed in dependency order
        assert all(
            names.index(next(t["name"] for t in steps if t["id"] == d)) < names.index(s["name"])
            for d in s["deps"]
        )
    ids = {s["name"]: s["id"] for s in steps}
    s = by_name(steps)
    assert s[LINK]["link"] is True and s[LINK]["deps"] == []
    assert [x["name"] for x in steps if x["link"]] == [LINK]
    assert s[EARLY]["kind"] == "copy" and s[ENV]["kind"] == "config"
    assert s["[stage-2] FROM scratch"]["kind"] == "base"
    # the step after a --link step waits for it: that is where its layer is stacked
    assert sorted(s[ENV]["deps"]) == sorted([ids[EARLY], ids[LINK]])
    # COPY --from waits for the last step of the source stage, across the stage boundary
    assert sorted(s[FROM_ASSETS]["deps"]) == sorted([ids[ENV], ids[ASSETS]])
    assert s[LATE]["deps"] == [ids[FROM_ASSETS]]


def test_status_before_after_build_and_after_edits(
    ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = plan_json(capsys, ctx, home)
    assert {s["name"] for s in before if s["status"] == "HIT"} == BASES
    assert blob_files(home) == set()

    build(ctx, home)
    after = plan_json(capsys, ctx, home)
    assert misses(after) == set()
    assert [(s["name"], s["key"]) for s in after] == [(s["name"], s["key"]) for s in before]

    # an edit under an early COPY: it and every non-link step after it miss; the --link
    # step after it and the other stage stay hits
    (ctx / "early" / "x.txt").write_text("x2\n")
    edited = plan_json(capsys, ctx, home)
    assert misses(edited) == {EARLY, ENV, FROM_ASSETS, LATE}
    assert by_name(edited)[LINK]["key"] == by_name(after)[LINK]["key"]

    # an edit in the source stage: it, the COPY --from and what follows miss
    (ctx / "early" / "x.txt").write_text("x\n")
    (ctx / "assets" / "a.css").write_text("body{color:red}\n")
    assert misses(plan_json(capsys, ctx, home)) == {ASSETS, FROM_ASSETS, LATE}

    # an edit to the --link source alone: the link step misses, the chain after it too
    # (its key stacks the link layer), the steps before it do not
    (ctx / "assets" / "a.css").write_text("body{}\n")
    (ctx / "big.txt").write_text("bigger\n")
    assert misses(plan_json(capsys, ctx, home)) == {LINK, ENV, FROM_ASSETS, LATE}


def test_plan_builds_nothing(ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build(ctx, home)
    (ctx / "early" / "x.txt").write_text("changed\n")
    (ctx / "late.txt").write_text("changed\n")
    blobs = blob_files(home)
    _, du, _ = cli(capsys, "cache", "du", "--home", home)
    _, ls, _ = cli(capsys, "cache", "ls", "--home", home)
    for fmt in ("text", "json", "dot"):
        code, _, err = cli(capsys, "plan", ctx, "--format", fmt, "--home", home)
        assert code == 0, err
    assert blob_files(home) == blobs
    assert cli(capsys, "cache", "du", "--home", home)[1] == du
    assert cli(capsys, "cache", "ls", "--home", home)[1] == ls
    assert misses(plan_json(capsys, ctx, home)) == {EARLY, ENV, FROM_ASSETS, LATE}


def home_listing(home: Path) -> dict[str, tuple[int, int, str]] | None:
    """Every path under the home: (size, mtime_ns, sha256 of a file's bytes); None if absent."""
    if not home.exists():
        return None
    out: dict[str, tuple[int, int, str]] = {}
    for p in sorted(home.rglob("*")):
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out[p.relative_to(home).as_posix()] = (
            st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest()
        )
    return out


@pytest.mark.slow
def test_plan_and_why_change_nothing_in_the_home(ctx: Path, tmp_path: Path) -> None:
    """Real CLI: plan and why create no home, and leave an existing one (its database and
    write-ahead log included) exactly as it was."""
    home = tmp_path / "new-home"
    for cmd in ("plan", "why"):
        p = lbuild(cmd, ctx, home=home)
        assert "MISS" in p.stdout
    assert not home.exists()
    assert "MISS" in lbuild("plan", ctx, "--exit-code", home=home, check=False).stdout
    assert not home.exists()

    build(ctx, home)
    (ctx / "late.txt").write_text("late 2\n")
    build(ctx, home)  # a second build leaves lbuild.db-wal behind: plan must not touch it
    (ctx / "late.txt").write_text("late 3\n")
    (ctx / "new.txt").write_text("never hashed before\n")
    before = home_listing(home)
    assert before is not None and "lbuild.db" in before
    p = lbuild("plan", ctx, "--exit-code", home=home, check=False)
    assert p.returncode == 1 and "MISS" in p.stdout and LATE in p.stdout, p.stdout + p.stderr
    p = lbuild("why", ctx, home=home)
    assert "late.txt content changed" in p.stdout, p.stdout
    assert home_listing(home) == before


def test_plan_leaves_an_index_it_cannot_read_alone(ctx: Path, tmp_path: Path) -> None:
    """An index of another schema (or not one) is a build's to migrate or repair, not plan's:
    plan says so and changes nothing (an empty answer, every step a MISS, would be wrong)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "lbuild.db").write_bytes(b"not a database\n")
    before = home_listing(home)
    p = lbuild("plan", ctx, home=home, check=False)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip() == (
        f"lbuild: error: cannot read the cache index {home}/lbuild.db: it is not a database"
        " (hint: run `lbuild cache verify --repair`)")
    assert home_listing(home) == before


def test_text_format_real_cli(ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build(ctx, home)
    (ctx / "late.txt").write_text("changed\n")
    steps = plan_json(capsys, ctx, home)
    p = lbuild("plan", ctx, home=home)
    lines = p.stdout.splitlines()
    assert len(lines) == len(steps)
    for line, s in zip(lines, steps, strict=True):
        m = re.fullmatch(r"(HIT |MISS) ([0-9a-f]{12}) (.*)", line)
        assert m, line
        assert m.group(1).strip() == s["status"]
        assert m.group(2) == s["key"][:12]
        assert m.group(3) == s["name"] + (" (link)" if s["link"] else "")
    assert f"HIT  {by_name(steps)[EARLY]['key'][:12]} {EARLY}" in lines
    assert f"MISS {by_name(steps)[LATE]['key'][:12]} {LATE}" in lines


def test_dot_format(ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = plan_json(capsys, ctx, home)
    code, dot, _ = cli(capsys, "plan", ctx, "--format", "dot", "--home", home)
    assert code == 0
    lines = dot.strip().splitlines()
    assert lines[0] == "digraph lbuild {" and lines[-1] == "}"
    assert dot.count("{") == dot.count("}") == 1
    node_re = re.compile(r'\s*"([^"]+)" \[label="((?:[^"\\]|\\.)*)".*\];')
    edge_re = re.compile(r'\s*"([^"]+)" -> "([^"]+)";')
    nodes: dict[str, str] = {}
    edges: set[tuple[str, str]] = set()
    for line in lines[1:-1]:
        if m := node_re.fullmatch(line):
            assert m.group(1) not in nodes, f"two node lines for {m.group(1)}"
            nodes[m.group(1)] = m.group(2)
        elif m := edge_re.fullmatch(line):
            edges.add((m.group(1), m.group(2)))
    assert set(nodes) == {s["id"] for s in steps}
    for s in steps:
        assert nodes[s["id"]].startswith(s["name"] + "\\n" + s["key"][:12] + " " + s["status"])
    assert edges == {(d, s["id"]) for s in steps for d in s["deps"]}


def test_target_picks_a_stage(ctx: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = plan_json(capsys, ctx, home, "--target", "assets")
    assert [s["name"] for s in steps] == ["[assets] FROM scratch", ASSETS]
    steps = plan_json(capsys, ctx, home, "--target", "unused")
    assert [s["name"] for s in steps] == [
        "[unused] FROM scratch",
        "[unused 1/1] COPY unused.txt /unused",
    ]


# ------------------------------------------------------------------ golden plan fixtures


def stable_shape(steps: list[Any]) -> list[dict[str, Any]]:
    """The plan without keys or ids: what a reviewer can check against the Dockerfile."""
    names = {s["id"]: s["name"] for s in steps}
    return [
        {
            "name": s["name"],
            "kind": s["kind"],
            "link": s["link"],
            "status": s["status"],
            "deps": sorted(names[d] for d in s["deps"]),
        }
        for s in steps
    ]


def case_args(case: Path) -> list[str]:
    f = case / "args.json"
    return [str(a) for a in json.loads(f.read_text())] if f.exists() else []


def test_fixture_counts() -> None:
    assert len(POSITIVE) >= 8
    assert len(NEGATIVE) >= 5


@pytest.mark.parametrize("case", POSITIVE, ids=[p.name for p in POSITIVE])
def test_golden(case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = tmp_path / "ctx"
    shutil.copytree(case, ctx, ignore=shutil.ignore_patterns("graph.json", "args.json"))
    actual = {"steps": stable_shape(plan_json(capsys, ctx, tmp_path / "home", *case_args(case)))}
    golden = case / "graph.json"
    if os.environ.get("LBUILD_REGEN"):
        golden.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
    assert golden.exists(), f"missing {golden}; run with LBUILD_REGEN=1 and review it"
    assert actual == json.loads(golden.read_text())


@pytest.mark.parametrize("case", NEGATIVE, ids=[p.name for p in NEGATIVE])
def test_negative(
    case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = tmp_path / "ctx"
    shutil.copytree(case, ctx, ignore=shutil.ignore_patterns("error.txt", "args.json"))
    expected = (case / "error.txt").read_text().rstrip("\n")
    home = tmp_path / "home"
    # run from inside the context so the message names "Dockerfile", as error.txt does
    monkeypatch.chdir(ctx)
    code, out, err = cli(capsys, "plan", ".", "--home", home, *case_args(case))
    assert code == 2
    assert out == ""
    assert err == f"lbuild: error: {expected}\n"
    assert blob_files(home) == set()


def test_negative_real_cli_exit_code(tmp_path: Path) -> None:
    case = FIXTURES / "plan-negative" / "stage-cycle"
    p = lbuild("plan", ".", home=tmp_path / "home", cwd=case, check=False)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr == "lbuild: error: " + (case / "error.txt").read_text()
