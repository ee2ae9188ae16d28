"""Tests for builder.plan.context: COPY/ADD source selection, walking, opening and hashing files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest

from builder.frontend.dockerignore import IgnoreRules, parse_dockerignore
from builder.plan.context import BuildContext, ContextFile, FileHasher, hash_file
from cache.errors import InvalidInput, NotFound

REPO = Path(__file__).resolve().parents[1]


def make_tree(root: Path, spec: dict[str, str | None]) -> None:
    """Create files (str content) and directories (None) under root."""
    for rel, content in spec.items():
        path = root / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


def ctx_of(root: Path, ignore: str = "") -> BuildContext:
    return BuildContext(root, parse_dockerignore(ignore))


def rels(files: list[ContextFile]) -> list[str]:
    return [f.rel for f in files]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "ctx"
    make_tree(
        root,
        {
            "a.txt": "A",
            "b.txt": "BB",
            "c.md": "C",
            ".hidden.txt": "H",
            "src/main.py": "print(1)\n",
            "src/util.py": "x = 1\n",
            "src/data.json": "{}",
            "lib/main.py": "pass\n",
            "lib/sub/deep.py": "",
            "empty": None,
            "star*name": "literal star",
        },
    )
    return root


def test_root_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="build context not found"):
        BuildContext(tmp_path / "missing", IgnoreRules())
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotFound, match="not a directory"):
        BuildContext(tmp_path / "file", IgnoreRules())


def test_select_literal_file_describes_it(tree: Path) -> None:
    os.chmod(tree / "a.txt", 0o4751)
    [f] = ctx_of(tree).select("a.txt")
    st = os.stat(tree / "a.txt")
    assert f == ContextFile(
        rel="a.txt",
        type="file",
        mode=0o4751,
        size=1,
        mtime_ns=st.st_mtime_ns,
        ino=st.st_ino,
        dev=st.st_dev,
        nlink=1,
        link="",
    )


def test_select_directory_and_cleaning(tree: Path) -> None:
    ctx = ctx_of(tree)
    for source in ("src", "src/", "./src", "src/.", "lib/../src"):
        [f] = ctx.select(source)
        assert (f.rel, f.type, f.size) == ("src", "dir", 0)


@pytest.mark.parametrize("source", [".", "./", "", "src/.."])
def test_select_root(tree: Path, source: str) -> None:
    [f] = ctx_of(tree).select(source)
    assert (f.rel, f.type, f.parts) == (".", "dir", ())


def test_select_wildcards(tree: Path) -> None:
    ctx = ctx_of(tree)
    assert rels(ctx.select("*.txt")) == [".hidden.txt", "a.txt", "b.txt"]
    assert rels(ctx.select("src/*.py")) == ["src/main.py", "src/util.py"]
    assert rels(ctx.select("*/main.py")) == ["lib/main.py", "src/main.py"]
    assert rels(ctx.select("[ab].txt")) == ["a.txt", "b.txt"]
    assert rels(ctx.select("?.md")) == ["c.md"]
    assert rels(ctx.select("s?c")) == ["src"]
    assert rels(ctx.select("*/sub/*.py")) == ["lib/sub/deep.py"]
    assert rels(ctx.select("star\\*n[a]me")) == ["star*name"]  # escape inside a wildcard source
    assert rels(ctx.select("star*name")) == ["star*name"]


def test_wildcards_only_match_kept_paths(tree: Path) -> None:
    ctx = ctx_of(tree, "b.txt\nlib\n")
    assert rels(ctx.select("*.txt")) == [".hidden.txt", "a.txt"]
    assert rels(ctx.select("*/main.py")) == ["src/main.py"]
    assert "lib" not in rels(ctx.select("*"))


def test_no_match_is_not_found_with_location(tree: Path) -> None:
    ctx = ctx_of(tree)
    with pytest.raises(NotFound) as exc:
        ctx.select("*.nope", file="Dockerfile", line=7)
    assert str(exc.value) == "Dockerfile:7: COPY source not found: *.nope"
    assert exc.value.exit_code == 2
    with pytest.raises(NotFound) as exc:
        ctx.select("missing.txt", file="Dockerfile", line=3, instruction="ADD")
    assert str(exc.value) == "Dockerfile:3: ADD source not found: missing.txt"
    with pytest.raises(NotFound):
        ctx.select("a.txt/inner")  # through a regular file


def test_excluded_source_is_not_found_with_hint(tree: Path) -> None:
    ctx = ctx_of(tree, "a.txt\nsrc\n")
    for source in ("a.txt", "src", "src/main.py"):
        with pytest.raises(NotFound) as exc:
            ctx.select(source, file="Dockerfile", line=2)
        assert exc.value.hint is not None and ".dockerignore" in exc.value.hint


@pytest.mark.parametrize(
    "source, rel",
    [("../a.txt", "a.txt"), ("a/../../a.txt", "a.txt"), ("..", "."), ("/a.txt", "a.txt"),
     ("/../../a.txt", "a.txt"), ("/", ".")],
)
def test_absolute_and_climbing_sources_are_cleaned_against_the_root(
    tree: Path, source: str, rel: str
) -> None:
    """BuildKit resolves a source with fs.RootPath: it names the path from the context root
    and can never leave it lexically (issue 9 item 6: the earlier error was wrong)."""
    (found,) = ctx_of(tree).select(source, file="Dockerfile", line=4)
    assert found.rel == rel


def test_absolute_source_missing_from_the_root_is_not_found(tree: Path) -> None:
    with pytest.raises(NotFound, match="COPY source not found: /etc/passwd"):
        ctx_of(tree).select("/etc/passwd", file="Dockerfile", line=4)


def test_bad_wildcard_pattern_is_invalid(tree: Path) -> None:
    with pytest.raises(InvalidInput) as exc:
        ctx_of(tree).select("src/[abc", file="Dockerfile", line=9)
    assert "bad COPY source pattern" in str(exc.value)
    assert exc.value.line == 9


def test_top_level_symlink_is_followed(tree: Path) -> None:
    (tree / "link.txt").symlink_to("src/main.py")
    (tree / "srclink").symlink_to("src")
    (tree / "lib" / "up").symlink_to("../src/util.py")
    ctx = ctx_of(tree)
    [f] = ctx.select("link.txt")
    target = os.stat(tree / "src" / "main.py")
    assert (f.rel, f.type, f.size, f.ino, f.link) == ("link.txt", "file", 9, target.st_ino, "")
    [f] = ctx.select("lib/up")
    assert (f.rel, f.type, f.size) == ("lib/up", "file", 6)
    [d] = ctx.select("srclink")
    assert (d.rel, d.type) == ("srclink", "dir")
    assert rels(list(ctx.walk("srclink"))) == [
        "srclink/data.json",
        "srclink/main.py",
        "srclink/util.py",
    ]
    # An intermediate symlinked directory resolves too, and wildcards follow matched links.
    assert rels(ctx.select("srclink/*.py")) == ["srclink/main.py", "srclink/util.py"]
    assert [f.type for f in ctx.select("*link*")] == ["file", "dir"]
    with ctx.open(ctx.select("link.txt")[0]) as fh:
        assert fh.read() == b"print(1)\n"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.txt", "src/../../outside.txt"])
def test_symlink_source_pointing_outside_is_invalid(tree: Path, target: str) -> None:
    (tree.parent / "outside.txt").write_text("secret")
    (tree / "evil").symlink_to(target)
    ctx = ctx_of(tree)
    with pytest.raises(InvalidInput) as exc:
        ctx.select("evil", file="Dockerfile", line=5)
    assert "points outside the build context" in exc.value.message
    assert exc.value.line == 5
    with pytest.raises(InvalidInput, match="points outside"):
        ctx.select("ev*")


def test_dangling_and_excluded_symlink_targets_are_not_found(tree: Path) -> None:
    (tree / "dangling").symlink_to("nowhere")
    (tree / "to_secret").symlink_to("secret.txt")
    (tree / "secret.txt").write_text("s")
    ctx = ctx_of(tree, "secret.txt\n")
    with pytest.raises(NotFound):
        ctx.select("dangling")
    with pytest.raises(NotFound):
        ctx.select("to_secret")
    names = rels(ctx.select("*"))
    assert "a.txt" in names
    assert not {"dangling", "to_secret", "secret.txt"} & set(names)


def test_symlink_loop_is_invalid(tree: Path) -> None:
    (tree / "loop1").symlink_to("loop2")
    (tree / "loop2").symlink_to("loop1")
    with pytest.raises(InvalidInput, match="too many levels of symbolic links"):
        ctx_of(tree).select("loop1")


def test_walk_order_types_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    make_tree(root, {"a/b": "1", "a.b": "2", "a/c/d": "3", "z": None})
    (root / "a" / "ln").symlink_to("../z")
    os.mkfifo(root / "a" / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
        files = list(ctx_of(root).walk("."))
    finally:
        sock.close()
    assert [(f.rel, f.type) for f in files] == [
        ("a", "dir"),
        ("a/b", "file"),
        ("a/c", "dir"),
        ("a/c/d", "file"),
        ("a/fifo", "fifo"),  # copied as a fifo, as BuildKit does; the socket is left out
        ("a/ln", "symlink"),
        ("a.b", "file"),
        ("z", "dir"),
    ]
    link = files[5]
    assert (link.link, link.size) == ("../z", 4)
    assert rels(list(ctx_of(root).walk("a/c"))) == ["a/c/d"]


def test_walk_applies_rules_and_reincludes_with_parents(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    make_tree(
        root,
        {
            "build/keep.txt": "k",
            "build/obj/x.o": "",
            "build/deep/er/keep.txt": "k2",
            "src/a.py": "",
            "src/a.pyc": "",
            "Dockerfile": "FROM scratch\n",
        },
    )
    ctx = ctx_of(root, "build\n!build/keep.txt\n!build/deep/**/keep.txt\n**/*.pyc\n")
    assert rels(list(ctx.walk("."))) == [
        "Dockerfile",
        "build",
        "build/deep",
        "build/deep/er",
        "build/deep/er/keep.txt",
        "build/keep.txt",
        "src",
        "src/a.py",
    ]
    # The excluded directory still exists for COPY because it holds kept paths.
    [f] = ctx.select("build")
    assert f.type == "dir"
    assert rels(list(ctx.walk("build"))) == [
        "build/deep",
        "build/deep/er",
        "build/deep/er/keep.txt",
        "build/keep.txt",
    ]
    with pytest.raises(NotFound):
        ctx.select("build/obj")


@pytest.mark.parametrize(
    "rules",
    [
        "",
        "*\n!d1\n",
        "d1\n!d1/*/f1\n",
        "**/f2\n!d2/**\n",
        "*\n!**/f1\nd2/d1\n",
        "d?\n!d1/d2\n*/*/f1\n",
    ],
)
def test_walk_equals_brute_force_filter(tmp_path: Path, rules: str) -> None:
    root = tmp_path / "ctx"
    for a in ("d1", "d2"):
        for b in ("d1", "d2"):
            make_tree(root, {f"{a}/{b}/f1": "", f"{a}/{b}/f2": "", f"{a}/f1": ""})
    make_tree(root, {"f1": "", "f2": ""})
    ignore = parse_dockerignore(rules)
    every = sorted(
        (p.relative_to(root).as_posix() for p in root.rglob("*")), key=lambda r: r.split("/")
    )
    kept = {r for r in every if not ignore.excluded(r)}
    # Docker also sends the parents of kept paths.
    for r in list(kept):
        parts = r.split("/")
        kept.update("/".join(parts[:n]) for n in range(1, len(parts)))
    expected = [r for r in every if r in kept]
    assert rels(list(BuildContext(root, ignore).walk("."))) == expected


def test_walk_errors(tree: Path) -> None:
    ctx = ctx_of(tree)
    with pytest.raises(NotFound):
        list(ctx.walk("nope"))
    with pytest.raises(InvalidInput, match="not a directory"):
        list(ctx.walk("a.txt"))
    # a path is cleaned against the context root, as BuildKit does (issue 9 item 6): "../"
    # is the root itself, never outside it
    assert rels(list(ctx.walk("../"))) == rels(list(ctx.walk(".")))


def test_special_files_are_skipped_by_wildcards_and_refused_by_name(tree: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tree / "sock.txt"))
        ctx = ctx_of(tree)
        assert "sock.txt" not in rels(ctx.select("*.txt"))
        with pytest.raises(InvalidInput, match="not a regular file, directory, symlink or fifo"):
            ctx.select("sock.txt")
    finally:
        sock.close()


def test_fifos_are_selected_as_fifos(tree: Path) -> None:
    os.mkfifo(tree / "pipe.txt")
    ctx = ctx_of(tree)
    assert "pipe.txt" in rels(ctx.select("*.txt"))
    [f] = ctx.select("pipe.txt")
    assert f.type == "fifo"


def test_open_reads_and_refuses_non_files(tree: Path) -> None:
    ctx = ctx_of(tree)
    [f] = ctx.select("src/main.py")
    with ctx.open(f) as fh:
        assert fh.read() == b"print(1)\n"
    [d] = ctx.select("src")
    with pytest.raises(InvalidInput, match="not a regular file"):
        ctx.open(d)
    (tree / "src" / "main.py").unlink()
    with pytest.raises(NotFound, match=r"cannot read src/main\.py"):
        ctx.open(f)
    # A path replaced by a fifo after selection must fail fast, not block.
    os.mkfifo(tree / "src" / "main.py")
    with pytest.raises(InvalidInput, match="not a regular file"):
        ctx.open(f)


def _run_without_dac(code: str) -> dict[str, str]:
    """Run Python code as root without CAP_DAC_OVERRIDE/READ_SEARCH, so modes are enforced."""
    if os.geteuid() != 0:
        pytest.skip("needs root (drops capabilities to make permission bits bite)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    proc = subprocess.run(
        ["setpriv", "--bounding-set", caps, "--inh-caps", caps, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout)
    return result


CHILD = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from builder.plan.context import BuildContext
    from builder.frontend.dockerignore import IgnoreRules
    ctx = BuildContext(Path({root!r}), IgnoreRules())
    out = {{}}
    try:
        [f] = ctx.select("secret.txt")
        ctx.open(f)
        out["open"] = "ok"
    except Exception as err:
        out["open"] = type(err).__name__ + ": " + str(err)
    try:
        list(ctx.walk("."))
        out["walk"] = "ok"
    except Exception as err:
        out["walk"] = type(err).__name__ + ": " + str(err)
    print(json.dumps(out))
    """
)


def test_unreadable_file_and_directory(tmp_path: Path) -> None:
    root = tmp_path / "ctx"
    make_tree(root, {"secret.txt": "s", "locked/inner": "i"})
    os.chmod(root / "secret.txt", 0)
    os.chmod(root / "locked", 0)
    try:
        out = _run_without_dac(CHILD.format(root=str(root)))
    finally:
        os.chmod(root / "locked", 0o755)
    assert out["open"] == "InvalidInput: cannot read secret.txt: Permission denied"
    assert out["walk"] == "InvalidInput: cannot read directory locked: Permission denied"


def test_hash_file_matches_blake3(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"hello")
    assert hash_file(small) == blake3.blake3(b"hello").hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_file(empty) == blake3.blake3(b"").hexdigest()
    big = tmp_path / "big"
    data = os.urandom((3 << 20) + 17)  # read in chunks, the last one short
    big.write_bytes(data)
    assert hash_file(big, os.stat(big)) == blake3.blake3(data).hexdigest()
    # the thread's buffer is reused: a shorter file after it must not see its bytes
    shorter = tmp_path / "shorter"
    rest = os.urandom((1 << 20) + 5)
    shorter.write_bytes(rest)
    assert hash_file(shorter) == blake3.blake3(rest).hexdigest()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # one buffer per thread
        got = list(pool.map(hash_file, [big, shorter] * 8))
    assert got == [blake3.blake3(data).hexdigest(), blake3.blake3(rest).hexdigest()] * 8
    hasher: FileHasher = hash_file
    assert hasher(small, os.stat(small)) == hash_file(small)


def test_hash_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="cannot read"):
        hash_file(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="not a regular file"):
        hash_file(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidInput, match="not a regular file"):
        hash_file(tmp_path / "fifo")


def test_hash_file_big_sparse_file_in_bounded_memory(tmp_path: Path) -> None:
    """1 GiB hashed under a 300 MiB data limit: reading it into memory would fail."""
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as fh:
        fh.truncate(1 << 30)
    expected = blake3.blake3()
    zeros = bytes(1 << 20)
    for _ in range(1024):
        expected.update(zeros)
    code = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_DATA, (300 << 20, 300 << 20))
        from pathlib import Path
        from builder.plan.context import hash_file
        print(hash_file(Path({str(sparse)!r})))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected.hexdigest()
