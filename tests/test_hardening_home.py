"""The cache home (issue 11 items 4 and 12): private (0700), refused when another user could
change it, and an unusable home is one line with the hint to set LBUILD_HOME."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from util import lbuild

HINT = "(hint: set LBUILD_HOME (or --home) to a directory this user can write)"


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    c = tmp_path / "ctx"
    c.mkdir()
    (c / "Dockerfile").write_text("FROM scratch\nCOPY a /a\n")
    (c / "a").write_text("a\n")
    return c


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _errors(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [x for x in p.stderr.splitlines() if x.strip()]


def test_new_home_is_private(tmp_path: Path, ctx: Path) -> None:
    home = tmp_path / "new" / "home"
    lbuild("build", ctx, home=home)
    assert _mode(home) == 0o700


def test_own_home_open_to_others_is_made_private(tmp_path: Path, ctx: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o777)
    lbuild("build", ctx, home=home)
    assert _mode(home) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the home to another user")
def test_home_another_user_can_write_is_refused(tmp_path: Path, ctx: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 54321, 54321)
    home.chmod(0o777)
    p = lbuild("build", ctx, home=home, check=False)
    assert p.returncode == 1
    assert _errors(p) == [
        f"lbuild: error: the cache home {home} belongs to uid 54321 (mode 0777): another "
        f"user could change what builds use {HINT}"
    ]
    assert os.listdir(home) == []


@pytest.fixture
def read_only_home(tmp_path: Path) -> Iterator[Path]:
    """A home that exists, holds a cache, and is mounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a read-only bind mount")
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(real), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_read_only_home_is_one_line_with_the_hint(read_only_home: Path, ctx: Path) -> None:
    for args in (("build", ctx), ("cache", "ls"), ("cache", "verify")):
        p = lbuild(*args, home=read_only_home, check=False)
        assert p.returncode == 1, args
        assert _errors(p) == [
            f"lbuild: error: cannot use the cache home {read_only_home}: Read-only file system "
            + HINT
        ], args


def test_home_that_cannot_be_created_is_one_line_with_the_hint(tmp_path: Path, ctx: Path) -> None:
    """$HOME naming a file (as a HOME unset or pointing nowhere does): no traceback."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    env = {"HOME": str(not_a_dir), "LBUILD_HOME": "", "XDG_CACHE_HOME": ""}
    p = lbuild("build", ctx, home=tmp_path / "unused", env=env, check=False)
    assert p.returncode == 1
    assert _errors(p) == [
        f"lbuild: error: cannot use the cache home {not_a_dir}/.cache/lbuild: Not a directory "
        + HINT
    ]


def test_shared_directory_as_home_is_refused_not_chmodded(tmp_path: Path, ctx: Path) -> None:
    """LBUILD_HOME=/tmp (or $HOME) must never be made 0700: a directory open to others that
    holds files lbuild did not make is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "someone-elses-file").write_text("x")
    p = lbuild("build", ctx, home=shared, check=False)
    assert p.returncode == 1
    assert _errors(p) == [
        f"lbuild: error: the cache home {shared} is open to other users (mode 1777) and holds "
        "files that are not lbuild's (hint: chmod 700 it, or set LBUILD_HOME (or --home) to a "
        "directory of its own)"
    ]
    assert _mode(shared) == 0o1777
