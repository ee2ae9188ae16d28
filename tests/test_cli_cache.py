"""A cache a user can see and manage (issue 15 item 3), through the real command line:
``cache du`` by kind checked against the files on disk, ``cache ls`` with Dockerfile, line and
instruction, ``cache prune`` of leftovers, snapshots and cache mounts, the note when
``--keep-bytes`` cannot be reached, and ``images``, ``tag``, ``rmi``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import run_fixtures
from run_fixtures import BUSYBOX, needs_root
from util import lbuild, write_files

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome

RUN_DOCKERFILE = f"""\
FROM {BUSYBOX}
COPY a.txt /a.txt
RUN --mount=type=cache,target=/var/cache/x echo cached > /var/cache/x/f && echo hi > /hi
RUN echo second > /second
"""


def cache(home: Path, *args: str, check: bool = True) -> Any:
    return lbuild("cache", *args, "--home", home, home=home, check=check)


def du(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cache(home, "du", "--format", "json").stdout)
    return data


def walk(root: Path) -> tuple[int, int]:
    """Bytes and files under ``root`` (non-directories, hard links once), read independently."""
    seen: set[int] = set()
    size = files = 0
    if not root.exists():
        return 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode) or st.st_ino in seen:
                continue
            if st.st_nlink > 1:
                seen.add(st.st_ino)
            size += st.st_size
            files += 1
    return size, files


def _run_build(tmp_path: Path, home: Path, *args: str) -> Path:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": RUN_DOCKERFILE, "a.txt": "a\n"})
    lbuild("build", ctx, "--progress", "plain", *args, home=home)
    return ctx


@needs_root
@pytest.mark.slow
def test_du_by_kind_and_prune_of_leftovers_snapshots_and_cache_mounts(
    tmp_path: Path, bbhome: Path
) -> None:
    _run_build(tmp_path, bbhome)
    left = bbhome / "tmp" / "run-left-behind"
    left.mkdir(parents=True)
    (left / "f").write_bytes(b"y" * 1000)
    d = du(bbhome)
    kinds = d["kinds"]
    assert d["total"] == sum(k["bytes"] for k in kinds.values())
    # the index's files change as it is opened (WAL): everything else is compared whole
    db = sum(p.stat().st_size for p in bbhome.glob("lbuild.db*"))
    assert d["total"] - kinds["db"]["bytes"] == walk(bbhome)[0] - db
    for kind, where in (("blobs", "blobs"), ("cache-mounts", "cache-mounts")):
        assert (kinds[kind]["bytes"], kinds[kind]["files"]) == walk(bbhome / where)
    assert kinds["cache-mounts"]["bytes"] == len("cached\n") and d["cache_mounts"] == 1
    assert kinds["snapshots"]["bytes"] > 0 and d["snapshots"] > 0  # the RUNs' base
    assert kinds["tmp"]["bytes"] >= 1000 and kinds["db"]["bytes"] > 0
    # a dry run lists and removes nothing; a plain prune removes the leftover only (the
    # snapshots and the cache mount a record names stay)
    dry = cache(bbhome, "prune", "--dry-run").stdout.splitlines()
    assert any(x.startswith("would remove tmp tmp/run-left-behind ") for x in dry), dry
    assert left.exists()
    out = cache(bbhome, "prune").stdout
    assert "removed tmp tmp/run-left-behind " in out and not left.exists()
    assert "snapshot" not in out and "cache-mount" not in out
    # unused for longer than 0s: every snapshot, cache mount and record goes
    out = cache(bbhome, "prune", "--keep-duration", "0s").stdout
    assert "removed snapshot " in out and "removed cache-mount " in out
    gone = du(bbhome)
    assert gone["snapshots"] == 0 and gone["cache_mounts"] == 0 and gone["records"] == 0
    assert walk(bbhome / "cache-mounts")[0] == 0
    assert gone["kinds"]["snapshots"]["bytes"] == walk(bbhome / "snapshots")[0]
    text = cache(bbhome, "du").stdout.splitlines()
    assert [line.split()[0] for line in text[:8]] == [
        "blobs", "snapshots", "cache-mounts", "tmp", "db", "memo", "other", "total"]


def _age(home: Path, *, markers: float, dirs: float) -> tuple[list[Path], list[Path]]:
    """Set the last-use markers of every committed snapshot and cache mount to ``markers``
    and their directories' mtimes to ``dirs``; returns (snapshots, cache mounts)."""
    snaps = sorted(home.glob("snapshots/*/committed/*"))
    mounts = sorted(p for p in (home / "cache-mounts").iterdir() if p.is_dir())
    for d, marker in [(s, s / "used") for s in snaps] + [
        (m, m.with_name(m.name + ".used")) for m in mounts
    ]:
        marker.touch()
        os.utime(marker, (markers, markers))
        os.utime(d, (dirs, dirs))
    return snaps, mounts


def _aged_out(home: Path) -> list[str]:
    out = cache(home, "prune", "--keep-duration", "7d", "--dry-run").stdout.splitlines()
    return [x for x in out if x.startswith(("would remove snapshot", "would remove cache-mount"))]


@needs_root
@pytest.mark.slow
def test_snapshots_and_cache_mounts_age_by_last_use_not_directory_mtime(
    tmp_path: Path, bbhome: Path
) -> None:
    ctx = _run_build(tmp_path, bbhome)
    recent, long_ago = 2_000_000_000.0, 1_000_000_000.0  # 2033 and 2001: no clock involved
    # used recently, directories old: prune --keep-duration keeps them
    snaps, mounts = _age(bbhome, markers=recent, dirs=long_ago)
    assert snaps and len(mounts) == 1
    out = cache(bbhome, "prune", "--keep-duration", "7d").stdout
    assert "snapshot" not in out and "cache-mount" not in out, out
    assert all(p.is_dir() for p in snaps + mounts)
    # used long ago, directories new: all of them would go, by age
    _age(bbhome, markers=long_ago, dirs=recent)
    gone = _aged_out(bbhome)
    assert len(gone) == len(snaps) + 1 and all(x.endswith("(age)") for x in gone), gone
    # a build that runs on a snapshot and mounts the cache marks them used
    lbuild("build", ctx, "--progress", "plain", "--no-cache", home=bbhome)
    after = _aged_out(bbhome)
    assert not any("cache-mount" in x for x in after), after
    assert len(after) < len(snaps), after
    # and prune really removes what was used long ago (markers, not directories, decide)
    _age(bbhome, markers=long_ago, dirs=recent)
    out = cache(bbhome, "prune", "--keep-duration", "7d").stdout
    assert "removed snapshot " in out and "removed cache-mount " in out, out
    d = du(bbhome)
    assert d["snapshots"] == 0 and d["cache_mounts"] == 0
    assert list((bbhome / "cache-mounts").iterdir()) == []  # the markers went with them


def test_ls_shows_dockerfile_line_and_instruction(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": "FROM scratch\n# a comment\nCOPY a.txt /a.txt\nENV E=1\n",
                      "a.txt": "a\n"})
    lbuild("build", ctx, home=home)
    rows = json.loads(cache(home, "ls", "--format", "json").stdout)
    got = sorted((r["line"], r["instruction"], r["dockerfile"]) for r in rows)
    dockerfile = str(ctx / "Dockerfile")
    assert got == [(3, "COPY a.txt /a.txt", dockerfile), (4, "ENV E=1", dockerfile)]
    text = cache(home, "ls").stdout
    assert f"{dockerfile}:3  COPY a.txt /a.txt" in text
    # the Dockerfile changed: a record whose instruction is no longer there has no line
    (ctx / "Dockerfile").write_text("FROM scratch\nENV E=2\n")
    rows = json.loads(cache(home, "ls", "--format", "json").stdout)
    copy = next(r for r in rows if r["op"] == "COPY")
    assert copy["line"] is None and copy["instruction"] == "COPY"


def test_prune_says_when_tagged_images_hold_more_than_keep_bytes(
    tmp_path: Path, home: Path
) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": "FROM scratch\nCOPY big /big\n", "big": b"z" * 200_000})
    lbuild("build", ctx, "-t", "app:1", home=home)
    (ctx / "big").write_bytes(b"w" * 100_000)
    lbuild("build", ctx, home=home)  # untagged: its layer may go
    out = cache(home, "prune", "--keep-bytes", "1KB").stdout.splitlines()
    notes = [x for x in out if "cannot be reached" in x]
    assert len(notes) == 1 and "tagged images hold" in notes[0], out
    assert sum(x.startswith("removed step ") for x in out) == 1  # the tag's record stays
    rows = json.loads(cache(home, "ls", "--format", "json").stdout)
    assert len(rows) == 1
    lbuild("unpack", "app:1", tmp_path / "rootfs", home=home)  # the tag still works
    assert (tmp_path / "rootfs" / "big").stat().st_size == 200_000
    # without the tag, the same cap is reached and nothing is said
    lbuild("rmi", "app:1", home=home)
    out = cache(home, "prune", "--keep-bytes", "1KB").stdout
    assert "cannot be reached" not in out
    assert du(home)["kinds"]["blobs"]["bytes"] == 0


def test_images_tag_rmi(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": "FROM scratch\nCOPY a /a\n", "a": "a\n"})
    lbuild("build", ctx, "-t", "app:1", "--iidfile", tmp_path / "iid", home=home)
    images = json.loads(lbuild("images", "--format", "json", home=home).stdout)
    assert [i["name"] for i in images] == ["app:1"]
    assert images[0]["created"] == "1970-01-01T00:00:00Z" and images[0]["size"] > 0
    for bad, message in (("foo::bar", "invalid reference format"),
                         ("Foo", "repository name (Foo) must be lowercase"),
                         ("foo:ba r", "invalid reference format")):
        p = lbuild("tag", "app:1", bad, home=home, check=False)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    p = lbuild("build", ctx, "-t", "foo::bar", home=home, check=False)
    assert p.returncode == 2 and "invalid reference format" in p.stderr, p.stderr
    lbuild("tag", "app:1", "registry.example:5000/team/app:2", home=home)
    lbuild("tag", "app:1", "other", home=home)
    text = lbuild("images", home=home).stdout.splitlines()
    assert text[0].split() == ["NAME", "DIGEST", "CREATED", "SIZE"]
    names = [line.split()[0] for line in text[1:]]
    assert names == ["app:1", "other:latest", "registry.example:5000/team/app:2"]
    assert len({line.split()[1] for line in text[1:]}) == 1  # one image, three names
    assert lbuild("rmi", "app:1", "other", home=home).stdout.splitlines() == [
        "Untagged: app:1", "Untagged: other:latest"]
    p = lbuild("rmi", "app:1", home=home, check=False)
    assert p.returncode == 2 and "No such image: app:1" in p.stderr
    p = lbuild("tag", "nope", "x", home=home, check=False)
    assert p.returncode == 2 and "No such image: nope:latest" in p.stderr
    # a tag made by `lbuild tag` is a base like any other
    child = tmp_path / "child"
    write_files(child, {"Dockerfile": "FROM registry.example:5000/team/app:2\nCOPY b /b\n",
                        "b": "b\n"})
    lbuild("build", child, home=home)
