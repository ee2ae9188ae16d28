"""End-to-end: bad input makes ``lbuild build`` exit 2 with ONE line on stderr naming
file:line where there is one, no traceback, no --output left behind and nothing left in
$LBUILD_HOME/tmp."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_build_copy import fail
from util import ROOT, lbuild, write_files


@pytest.fixture(scope="module")
def ectx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ectx")
    write_files(
        root, {"a.txt": "a\n", "dir/f": "f\n", "Dockerfile": "FROM scratch\nCOPY a.txt /\n"}
    )
    os.symlink("/etc/passwd", root / "abs-out")
    os.symlink("../../etc/hostname", root / "rel-out")
    os.symlink("/etc", root / "dir/escape")
    return root


def bad(ctx: Path, home: Path, work: Path, dockerfile: str | None, *extra: str) -> tuple[str, Path]:
    """A build that must fail cleanly; also checks that the cache's tmp/ holds nothing."""
    line, df = fail(ctx, home, work, dockerfile, *extra)
    assert line.startswith("lbuild: error: "), line
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
    return line, df


def test_missing_dockerfile(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, _ = bad(ectx, home, tmp_path, None, "-f", str(tmp_path / "nope.Dockerfile"))
    assert "Dockerfile not found" in line and "nope.Dockerfile" in line
    empty = tmp_path / "empty-ctx"
    empty.mkdir()
    line, _ = bad(empty, home, tmp_path, None)
    assert "Dockerfile not found" in line


def test_missing_context(home: Path, tmp_path: Path) -> None:
    line, _ = bad(tmp_path / "no-such-dir", home, tmp_path, "FROM scratch\n")
    assert "build context not found" in line and "no-such-dir" in line


@pytest.mark.parametrize(
    "context,words",
    [
        ("-", "read from stdin (CONTEXT -)"),
        ("https://github.com/example/app.git", "remote build context (https://github.com/example/app.git)"),
        ("git@github.com:example/app.git", "remote build context (git@github.com:example/app.git)"),
        ("https://example.com/context.tar.gz", "remote build context (https://example.com/context.tar.gz)"),
    ],
)
def test_docker_context_forms_not_supported_yet(
    context: str, words: str, home: Path, tmp_path: Path
) -> None:
    """Docker's stdin and remote contexts: exit 2 "not supported yet" naming the form, not
    "build context not found" (stdin is not read)."""
    for cmd in ("build", "plan"):
        p = subprocess.run(
            [sys.executable, "-m", "builder", cmd, context, "--home", str(home)],
            input="FROM scratch\n", capture_output=True, text=True, cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr
        assert lines[0].startswith("lbuild: error: ")
        assert words in lines[0] and "not supported yet" in lines[0]
    assert not (tmp_path / "-").exists()


def test_unknown_instruction(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, df = bad(ectx, home, tmp_path, "FROM scratch\nCOPY a.txt /\n\nFROOB x\n")
    assert f"{df}:4:" in line and "FROOB" in line.upper()


@pytest.mark.parametrize(
    "src,words",
    [
        ("missing.txt", "not found"),
        ("../missing.txt", "not found"),  # cleaned against the root, as BuildKit does
        ("/missing.txt", "not found"),
        ("abs-out", "outside the build context"),
        ("rel-out", "outside the build context"),
        ("nomatch*", "not found"),
    ],
)
def test_bad_copy_source(ectx: Path, home: Path, tmp_path: Path, src: str, words: str) -> None:
    line, df = bad(ectx, home, tmp_path, f"FROM scratch\nCOPY a.txt /\nCOPY {src} /x/\n")
    assert f"{df}:3:" in line and words in line and src.rstrip("*") in line


def test_symlink_inside_copied_dir_is_copied_not_followed(
    ectx: Path, home: Path, tmp_path: Path
) -> None:
    """The counterpart of the escapes above: a link below a copied directory is data."""
    from test_build_copy import D, F, L, build

    b = build(ectx, home, tmp_path, "FROM scratch\nCOPY dir /d/\n")
    mode = (ectx / "dir/f").stat().st_mode & 0o7777
    assert b.tree == {"d": D(), "d/f": F("f\n", mode), "d/escape": L("/etc")}


def test_copy_from_source_missing_in_stage(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, df = bad(
        ectx,
        home,
        tmp_path,
        "FROM scratch AS s\nCOPY a.txt /\nFROM scratch\nCOPY --from=s /nope /\n",
    )
    assert f"{df}:4:" in line and "/nope" in line


@pytest.mark.slow
def test_unknown_stage_context_or_image(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, df = bad(ectx, home, tmp_path, "FROM scratch\nCOPY --from=nowhere /x /\n")
    assert f"{df}:2:" in line and "nowhere" in line
    line, df = bad(ectx, home, tmp_path, "FROM scratch\nCOPY a.txt /\nFROM no/such:image\n")
    assert f"{df}:3:" in line and "no/such:image" in line
    # FROM may only name a stage defined before it
    line, df = bad(
        ectx,
        home,
        tmp_path,
        "FROM later AS first\nCOPY a.txt /\nFROM scratch AS later\nCOPY --from=first /a.txt /\n",
    )
    assert f"{df}:1:" in line and "later" in line
    # a --build-context that is not a layout
    line, _ = bad(
        ectx,
        home,
        tmp_path,
        "FROM base\n",
        "--build-context",
        f"base=oci-layout://{tmp_path / 'nolayout'}",
    )
    assert "base" in line and "nolayout" in line


def test_unknown_target(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, _ = bad(ectx, home, tmp_path, "FROM scratch AS one\nCOPY a.txt /\n", "--target", "two")
    assert "two" in line


def test_cycle_between_stages(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, df = bad(
        ectx,
        home,
        tmp_path,
        "FROM scratch AS a\nCOPY --from=b /x /\nFROM scratch AS b\nCOPY --from=a /y /\n",
    )
    assert "circular" in line and f"{df}:" in line
    line, df = bad(
        ectx, home, tmp_path, "FROM scratch AS a\nCOPY a.txt /\nCOPY --from=a /a.txt /b\n"
    )
    assert f"{df}:3:" in line and "circular" in line


def test_bad_flags(ectx: Path, home: Path, tmp_path: Path) -> None:
    line, df = bad(ectx, home, tmp_path, "FROM scratch\nCOPY --chmod=9z a.txt /\n")
    assert f"{df}:2:" in line and "9z" in line
    line, _ = bad(ectx, home, tmp_path, "FROM scratch\nCOPY a.txt /\n", "--output", "type=tar")
    assert "--output" in line


def test_bad_source_date_epoch(ectx: Path, home: Path, tmp_path: Path) -> None:

    out = tmp_path / "out"
    p = lbuild(
        "build",
        ectx,
        "--output",
        f"type=oci,dest={out}",
        home=home,
        check=False,
        env={"SOURCE_DATE_EPOCH": "yesterday"},
    )
    assert p.returncode == 2 and "SOURCE_DATE_EPOCH" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --- unreadable files: root reads everything, so drop the capabilities that let it --------------

SETPRIV = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def _unprivileged(ctx: Path, home: Path, tmp_path: Path, dockerfile: str) -> tuple[int, str, Path]:
    import subprocess

    df = tmp_path / "Dockerfile"
    df.write_text(dockerfile)
    out = tmp_path / "out"
    env = {**os.environ, "LBUILD_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("SOURCE_DATE_EPOCH", None)
    p = subprocess.run(
        [
            *SETPRIV,
            sys.executable,
            "-m",
            "builder",
            "build",
            str(ctx),
            "-f",
            str(df),
            "--progress",
            "json",
            "--output",
            f"type=oci,dest={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    return p.returncode, p.stderr, out


needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv"
)


@pytest.fixture
def unreadable(tmp_path: Path) -> Path:
    root = tmp_path / "uctx"
    write_files(root, {"ok": "ok\n", "locked": "secret\n", "ldir/f": "f\n"})
    os.chmod(root / "locked", 0)
    os.chmod(root / "ldir", 0)
    return root


@needs_setpriv
def test_unreadable_file_exit_2(unreadable: Path, home: Path, tmp_path: Path) -> None:
    rc, err, out = _unprivileged(
        unreadable, home, tmp_path, "FROM scratch\nCOPY ok /\nCOPY locked /\n"
    )
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "locked" in lines[0] and "Permission denied" in lines[0]
    assert not out.exists()


@needs_setpriv
def test_unreadable_dir_exit_2(unreadable: Path, home: Path, tmp_path: Path) -> None:
    rc, err, out = _unprivileged(unreadable, home, tmp_path, "FROM scratch\nCOPY ldir /d/\n")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "ldir" in lines[0] and "Permission denied" in lines[0]
    assert not out.exists()


@needs_setpriv
def test_unreadable_source_error_names_the_line(
    unreadable: Path, home: Path, tmp_path: Path
) -> None:
    rc, err, _ = _unprivileged(
        unreadable, home, tmp_path, "FROM scratch\nCOPY ok /\nCOPY locked /\n"
    )
    assert rc == 2 and f"{tmp_path / 'Dockerfile'}:3:" in err


def test_failure_during_solve_leaves_nothing(ectx: Path, home: Path, tmp_path: Path) -> None:
    """--chown by name is resolved while building: earlier layers are already written."""
    line, df = bad(
        ectx,
        home,
        tmp_path,
        "FROM scratch\nCOPY dir /d/\nCOPY a.txt /e/\nCOPY --chown=nobody a.txt /\n",
    )
    assert f"{df}:4:" in line and "nobody" in line
