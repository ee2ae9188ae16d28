"""Tests for ``lbuild why``: each kind of change names the right input of the right step.

Every case builds a small context once, changes one thing, and reads ``lbuild why``: the
changed step gets the sentence for that change, the non-link steps after it "parent step
changed", and every other step is shown as HIT.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import BUSYBOX, needs_root
from util import lbuild, write_files

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome

DOCKERFILE = """\
FROM scratch
ARG V=one
ENV X=1
COPY src/ /app
COPY --link extra.txt /extra.txt
ENV Y=$V
COPY late.txt /late.txt
"""

FILES: dict[str, str | bytes] = {
    "Dockerfile": DOCKERFILE,
    "src/main.py": "print('hi')\n",
    "src/run.sh": "echo hi\n",
    "src/lib/util.py": "X = 1\n",
    "extra.txt": "extra\n",
    "late.txt": "late\n",
}

ARG = "[stage-0 1/6] ARG V=one"
ENV_X = "[stage-0 2/6] ENV X=1"
COPY_SRC = "[stage-0 3/6] COPY src/ /app"
LINK = "[stage-0 4/6] COPY --link extra.txt /extra.txt"
ENV_Y = "[stage-0 5/6] ENV Y=$V"
LATE = "[stage-0 6/6] COPY late.txt /late.txt"
BASE = "[stage-0] FROM scratch"
ALL = [BASE, ARG, ENV_X, COPY_SRC, LINK, ENV_Y, LATE]

Why = dict[str, list[str] | None]  # step name -> reasons when MISS, None when HIT


def parse_why(text: str) -> Why:
    """``HIT  name`` / ``MISS name`` lines, each MISS followed by ``     - reason`` lines."""
    out: Why = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("HIT  "):
            out[line[5:]] = current = None
        elif line.startswith("MISS "):
            current = []
            out[line[5:]] = current
        else:
            assert line.startswith("     - ") and current is not None, line
            current.append(line[7:])
    return out


def why(ctx: Path, home: Path, *args: str) -> Why:
    p = lbuild("why", ctx, *args, home=home)
    assert p.stderr == ""
    return parse_why(p.stdout)


def built(tmp_path: Path, home: Path, files: dict[str, str | bytes] = FILES) -> Path:
    ctx = tmp_path / "ctx"
    write_files(ctx, files)
    (ctx / "src" / "run.sh").chmod(0o644)
    os.symlink("main.py", ctx / "src" / "entry")
    lbuild("build", ctx, "--progress", "plain", home=home)
    return ctx


def expect(
    result: Why, changed: dict[str, list[str]], after: list[str], names: list[str] = ALL
) -> None:
    """``changed`` steps give exactly these reasons, ``after`` steps "parent step changed",
    every other step of ``names`` is a HIT."""
    assert set(result) == set(names), result
    for name in names:
        if name in changed:
            assert result[name] == changed[name], (name, result[name])
        elif name in after:
            assert result[name] == ["parent step changed"], (name, result[name])
        else:
            assert result[name] is None, (name, result[name])


def test_no_change_all_hit(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    expect(why(ctx, home), {}, [])


def test_never_built_is_new_step(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, FILES)
    result = why(ctx, home)
    assert result[BASE] is None
    assert all(result[n] == ["new step"] for n in ALL if n != BASE)


Edit = Callable[[Path], None]


def _content(ctx: Path) -> None:
    (ctx / "src" / "main.py").write_text("print('bye')\n")


def _mode(ctx: Path) -> None:
    (ctx / "src" / "run.sh").chmod(0o755)


def _added(ctx: Path) -> None:
    (ctx / "src" / "lib" / "new.py").write_text("Y = 2\n")


def _removed(ctx: Path) -> None:
    (ctx / "src" / "lib" / "util.py").unlink()


def _retarget(ctx: Path) -> None:
    (ctx / "src" / "entry").unlink()
    os.symlink("run.sh", ctx / "src" / "entry")


def _ignored(ctx: Path) -> None:
    (ctx / ".dockerignore").write_text("src/run.sh\n")


def _dir_to_file(ctx: Path) -> None:
    (ctx / "src" / "lib" / "util.py").unlink()
    (ctx / "src" / "lib").rmdir()
    (ctx / "src" / "lib").write_text("now a file\n")


COPY = "COPY src/ /app: "
SOURCE_CASES: dict[str, tuple[Edit, list[str]]] = {
    "content": (_content, [COPY + "src/main.py content changed"]),
    "mode": (_mode, [COPY + "src/run.sh mode 0644 -> 0755"]),
    "added": (_added, [COPY + "src/lib/new.py added"]),
    "removed": (_removed, [COPY + "src/lib/util.py removed"]),
    "symlink": (_retarget, [COPY + "src/entry symlink target 'main.py' -> 'run.sh'"]),
    "dockerignore": (_ignored, [COPY + "src/run.sh removed"]),
    "dir-to-file": (
        _dir_to_file,
        [COPY + "src/lib type dir -> file", COPY + "src/lib/util.py removed"],
    ),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_source_change(case: str, tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    edit, reasons = SOURCE_CASES[case]
    edit(ctx)
    # the --link step after the edited COPY stays a hit
    expect(why(ctx, home), {COPY_SRC: reasons}, [ENV_Y, LATE])


def test_link_source_change(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    (ctx / "extra.txt").write_text("more\n")
    expect(
        why(ctx, home),
        {LINK: ["COPY --link extra.txt /extra.txt: extra.txt content changed"]},
        [ENV_Y, LATE],
    )


def test_env_change(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("ENV X=1", "ENV X=2"))
    env_x = "[stage-0 2/6] ENV X=2"
    names = [env_x if n == ENV_X else n for n in ALL]
    expect(why(ctx, home), {env_x: ["ENV X changed"]}, [COPY_SRC, ENV_Y, LATE], names)


def test_build_arg_change(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    expect(
        why(ctx, home, "--build-arg", "V=two"),
        {ARG: ["build arg V changed"], ENV_Y: ["ENV Y changed"]},
        [ENV_X, COPY_SRC, LATE],
    )


def test_new_instruction_at_the_end(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    (ctx / "Dockerfile").write_text(DOCKERFILE + "LABEL extra=1\n")
    p = lbuild("why", ctx, home=home)
    result = parse_why(p.stdout)
    # the step count in every name changed (n/7): compare by instruction text
    texts = {name.split("] ", 1)[1]: r for name, r in result.items()}
    assert texts["LABEL extra=1"] == ["new step"]
    assert all(r is None for t, r in texts.items() if t != "LABEL extra=1"), texts


def test_instruction_type_changed_at_a_position(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    (ctx / "Dockerfile").write_text(DOCKERFILE.replace("COPY late.txt /late.txt", "LABEL l=1"))
    result = why(ctx, home)
    assert result["[stage-0 6/6] LABEL l=1"] == ["instruction changed: COPY -> LABEL"]


RUN_DOCKERFILE = f"""\
FROM {BUSYBOX}
ARG A=1
ENV E=x
RUN echo hi > /hi
RUN echo "$A" > /a
"""
R_ARG = "[stage-0 1/4] ARG A=1"
R_ENV = "[stage-0 2/4] ENV E=x"
R_HI = "[stage-0 3/4] RUN echo hi > /hi"
R_A = '[stage-0 4/4] RUN echo "$A" > /a'
R_ALL = [f"[stage-0] FROM {BUSYBOX}", R_ARG, R_ENV, R_HI, R_A]


@needs_root
def test_run_changes(tmp_path: Path, bbhome: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": RUN_DOCKERFILE})
    lbuild("build", ctx, "--progress", "plain", home=bbhome)
    expect(why(ctx, bbhome), {}, [], R_ALL)

    # a build arg reaches every RUN after the ARG: each names it, not "parent step changed"
    reason = ["build arg A changed"]
    expect(
        why(ctx, bbhome, "--build-arg", "A=2"),
        {R_ARG: reason, R_HI: reason, R_A: reason},
        [R_ENV],
        R_ALL,
    )

    # the command itself; the RUN after it only has a new parent
    (ctx / "Dockerfile").write_text(RUN_DOCKERFILE.replace("echo hi", "echo ho"))
    r_ho = R_HI.replace("echo hi", "echo ho")
    names = [r_ho if n == R_HI else n for n in R_ALL]
    expect(
        why(ctx, bbhome),
        {r_ho: ["RUN echo ho > /hi: instruction changed (command)"]},
        [R_A],
        names,
    )

    # an ENV value is in the environment of every later RUN
    (ctx / "Dockerfile").write_text(RUN_DOCKERFILE.replace("E=x", "E=y"))
    r_env = R_ENV.replace("E=x", "E=y")
    names = [r_env if n == R_ENV else n for n in R_ALL]
    expect(
        why(ctx, bbhome),
        {r_env: ["ENV E changed"], R_HI: ["ENV E changed"], R_A: ["ENV E changed"]},
        [],
        names,
    )


STAGES = """\
FROM scratch AS lib
COPY lib.txt /lib.txt

FROM lib AS app
ENV A=1
COPY --from=lib /lib.txt /copy.txt
COPY app.txt /app.txt
"""
S_LIB = "[lib 1/1] COPY lib.txt /lib.txt"
S_ENV = "[app 1/3] ENV A=1"
S_FROM = "[app 2/3] COPY --from=lib /lib.txt /copy.txt"
S_APP = "[app 3/3] COPY app.txt /app.txt"
S_ALL = ["[lib] FROM scratch", S_LIB, "[app] FROM lib", S_ENV, S_FROM, S_APP]


def test_stage_changes(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": STAGES, "lib.txt": "1\n", "app.txt": "a\n"})
    lbuild("build", ctx, "--progress", "plain", home=home)
    (ctx / "lib.txt").write_text("2\n")
    expect(
        why(ctx, home),
        {
            S_LIB: ["COPY lib.txt /lib.txt: lib.txt content changed"],
            # FROM <stage> is listed as a HIT: the first step after it names the stage
            S_ENV: ["base stage changed: FROM lib"],
            S_FROM: ["source stage of --from changed"],
        },
        [S_APP],
        S_ALL,
    )
    (ctx / "lib.txt").write_text("1\n")
    expect(
        why(ctx, home, "--no-cache-filter", "app"),
        {n: ["--no-cache-filter app"] for n in (S_ENV, S_FROM, S_APP)},
        [],
        S_ALL,
    )
    expect(
        why(ctx, home, "--no-cache"),
        {n: ["--no-cache"] for n in (S_LIB, S_ENV, S_FROM, S_APP)},
        [],
        S_ALL,
    )


def test_base_image_change(tmp_path: Path, home: Path) -> None:
    base = tmp_path / "base"
    write_files(base, {"Dockerfile": "FROM scratch\nCOPY x.txt /x\n", "x.txt": "1\n"})
    lbuild("build", base, "-t", "base:1", "--progress", "plain", home=home)
    ctx = tmp_path / "ctx"
    write_files(
        ctx,
        {
            "Dockerfile": "FROM base:1\nENV A=1\nCOPY --link l.txt /l\nCOPY a.txt /a\n",
            "a.txt": "a\n",
            "l.txt": "l\n",
        },
    )
    lbuild("build", ctx, "--progress", "plain", home=home)
    (base / "x.txt").write_text("2\n")
    out = lbuild("build", base, "-t", "base:1", "--progress", "plain", home=home).stderr
    digest = out.strip().splitlines()[-1].split()[-1]
    assert digest.startswith("sha256:")
    names = [
        "[stage-0] FROM base:1",
        "[stage-0 1/3] ENV A=1",
        "[stage-0 2/3] COPY --link l.txt /l",
        "[stage-0 3/3] COPY a.txt /a",
    ]
    expect(
        why(ctx, home),
        {names[1]: [f"base image changed: FROM base:1 is now {digest}"]},
        [names[3]],
        names,
    )


def test_missing_layer_blob(tmp_path: Path, home: Path) -> None:
    ctx = built(tmp_path, home)
    import sqlite3

    with sqlite3.connect(home / "lbuild.db") as db:
        rows = db.execute("SELECT diff_id, inputs FROM steps").fetchall()
    (diff_id,) = [d for d, i in rows if '"late.txt"' in i]
    (home / "blobs" / "sha256" / diff_id.split(":", 1)[1]).unlink()
    expect(why(ctx, home), {LATE: ["the cached layer is missing from the store"]}, [])
