"""COPY --exclude and COPY --parents with Dockerfile 1.7+ semantics (issue 9 item 3).

The rules are BuildKit's (frontend/dockerfile/dockerfile2llb/convert_copy.go and
tonistiigi/fsutil/copy): excludes are .dockerignore patterns matched below each source,
--parents copies from the root (or a ``/./`` pivot) with the path as an include pattern.
Before this, both flags were parsed and then ignored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from util import lbuild, tree, umoci_unpack

from builder.plan.sourcefilter import exclude_rules, include_rules, keep_filter, split_parents
from cache.errors import InvalidInput

FOUND = [
    ("", True), ("a", True), ("a/b", True), ("a/b/c.txt", False), ("a/b/d.md", False),
    ("sub", True), ("sub/s.txt", False), ("sub/t.txt", False), ("top.md", False),
]


def test_split_parents() -> None:
    assert split_parents("a/b/c.txt") == ("/", "a/b/c.txt")
    assert split_parents("./x/./y/*.txt") == ("./x", "y/*.txt")
    assert split_parents("/src/./x/../y") == ("/src", "y")


def test_exclude_filters_below_the_source_with_dockerignore_rules() -> None:
    keep = keep_filter(None, exclude_rules(["*.md", "sub", "!sub/s.txt"]))
    assert keep is not None
    # "*.md" is one segment: a/b/d.md stays (patternmatcher anchors at the source root)
    assert keep(FOUND) == {"", "a", "a/b", "a/b/c.txt", "a/b/d.md", "sub", "sub/s.txt"}


def test_parents_include_pattern_keeps_matches_and_their_parents() -> None:
    keep = keep_filter(include_rules("a/b/c.txt"), None)
    assert keep is not None and keep(FOUND) == {"", "a", "a/b", "a/b/c.txt"}
    keep = keep_filter(include_rules("*/*.txt"), exclude_rules(["sub/t.txt"]))
    assert keep is not None and keep(FOUND) == {"", "sub", "sub/s.txt"}


def test_bad_exclude_pattern() -> None:
    with pytest.raises(InvalidInput, match=r"Dockerfile:3: invalid --exclude pattern '\[x'"):
        exclude_rules(["[x"], "Dockerfile", 3)
    with pytest.raises(InvalidInput, match="invalid --exclude pattern '!'"):
        exclude_rules(["!"])


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")
def test_exclude_and_parents_end_to_end(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    for rel, text in {
        "a/b/c.txt": "c", "a/b/d.md": "d", "x/y/z.txt": "z", "dir/keep.txt": "k",
        "dir/sub/s.txt": "s", "dir/node/n.js": "n", "dir/skip.md": "m",
    }.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_text(text)
    os.chmod(ctx / "a", 0o750)
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS s\n"
        "COPY . /src/\n"
        "FROM scratch\n"
        "COPY --parents a/b/c.txt x/./y/*.txt /p/\n"
        "COPY --exclude=*.md --exclude=node dir /e/\n"
        "COPY --exclude=sub --exclude=!sub/s.txt dir/ /r/\n"
        "COPY --from=s --parents /src/./a/b/c.txt /f/\n"
        "COPY --from=s --exclude=*.md --exclude=node /src/dir /g/\n"
    )
    out = tmp_path / "out"
    lbuild("build", "-o", f"type=oci,dest={out}", ctx, home=home)
    t = tree(umoci_unpack(out, tmp_path / "u"))
    got = {p for p in t if p.split("/")[0] in ("p", "e", "r", "f", "g")}
    assert got == {
        "p", "p/a", "p/a/b", "p/a/b/c.txt", "p/y", "p/y/z.txt",
        "e", "e/keep.txt", "e/sub", "e/sub/s.txt",
        "r", "r/keep.txt", "r/node", "r/node/n.js", "r/skip.md", "r/sub", "r/sub/s.txt",
        "f", "f/a", "f/a/b", "f/a/b/c.txt",
        "g", "g/keep.txt", "g/sub", "g/sub/s.txt",
    }
    assert t["p/a"][1] == 0o750 and t["f/a"][1] == 0o750  # parents keep their own metadata
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY --parents a/nope.txt /p/\n")
    p = lbuild("build", ctx, home=home, check=False)
    assert p.returncode == 2 and "Dockerfile:2: COPY source not found: a/nope.txt" in p.stderr
