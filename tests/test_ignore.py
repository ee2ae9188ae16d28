"""Tests for builder.frontend.dockerignore: Docker's .dockerignore semantics (moby/patternmatcher)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.frontend.dockerignore import (
    IgnoreRules,
    Pattern,
    PatternSyntaxError,
    compile_segment,
    go_clean,
    has_wildcards,
    load_ignore,
    parse_dockerignore,
)
from cache.errors import InvalidInput


def excluded(text: str, rel: str) -> bool:
    return parse_dockerignore(text).excluded(rel)


# Single-pattern cases: what Docker's own matcher answers (pattern, path, excluded).
SINGLE = [
    ("**", "file", True),
    ("**", "dir/file", True),
    ("**/", "file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/dir2/file", True),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "file", True),
    ("**file", "dir/file", True),
    ("**/file", "dir/dir/file", True),
    ("**/file*", "dir/dir/file.txt", True),
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("a[b-d]e", "ae", False),
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    ("a[^b-d]e", "ace", False),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcdef", False),
    ("abc.def", "abc.def", True),
    ("abc?def", "abcZdef", True),
    ("abc?def", "abcdef", False),
    ("a\\\\", "a\\", True),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("**/foo/bar", "foo/bar", True),
    ("**/foo/bar", "dir/dir2/foo/bar", True),
    ("abc/**", "abc", False),
    ("abc/**", "abc/def/ghi", True),
    ("**/.foo", ".foo", True),
    ("**/.foo", "bar.foo", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a(b)c/def", "a(b)c/xyz", False),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
]


@pytest.mark.parametrize(("pattern", "rel", "expected"), SINGLE)
def test_single_pattern_matches_like_docker(pattern: str, rel: str, expected: bool) -> None:
    assert excluded(pattern, rel) is expected


def test_docker_docs_example() -> None:
    rules = parse_dockerignore("# comment\n*/temp*\n*/*/temp*\ntemp?\n")
    assert len(rules.patterns) == 3
    assert rules.excluded("somedir/temporary.txt")
    assert rules.excluded("somedir/temp")
    assert rules.excluded("somedir/temp/inside/deep.txt")  # a matched directory hides its tree
    assert rules.excluded("somedir/subdir/temporary.txt")
    assert rules.excluded("tempa")
    assert rules.excluded("tempb")
    assert not rules.excluded("temp")
    assert not rules.excluded("tempab")
    assert not rules.excluded("temporary.txt")  # `*/temp*` needs one directory level
    assert not rules.excluded("a/b/c/temp")  # `*/*/temp*` is exactly two levels
    assert not rules.excluded("# comment")


def test_exception_after_wildcard_and_last_match_wins() -> None:
    rules = parse_dockerignore("*.md\n!README*.md\n")
    assert rules.excluded("CHANGES.md")
    assert not rules.excluded("README-secret.md")
    assert not rules.excluded("README.md")
    assert not rules.excluded("docs/other.md")  # anchored at the root, not at any depth

    # Docs: the exception comes last, so README-secret.md is still sent.
    rules = parse_dockerignore("*.md\nREADME-secret.md\n!README*.md\n")
    assert not rules.excluded("README-secret.md")
    # And when the plain pattern comes last it wins.
    rules = parse_dockerignore("*.md\n!README*.md\nREADME-secret.md\n")
    assert rules.excluded("README-secret.md")
    assert not rules.excluded("README.md")


def test_exception_reincludes_file_inside_excluded_dir() -> None:
    rules = parse_dockerignore("build\n!build/keep.txt\n")
    assert rules.excluded("build")
    assert rules.excluded("build/other.o")
    assert rules.excluded("build/sub/x")
    assert not rules.excluded("build/keep.txt")
    assert rules.may_include_below("build")
    assert not rules.may_include_below("build/sub")
    # A later plain pattern matching a parent overrides the exception.
    rules = parse_dockerignore("**\n!util/docker/web\nutil/docker/web/foo\n")
    assert not rules.excluded("util/docker/web/bar")
    assert rules.excluded("util/docker/web/foo")
    assert rules.excluded("util/docker/web/foo/deeper")


def test_leading_slash_is_root_anchor_not_any_depth() -> None:
    rules = parse_dockerignore("/foo\n")
    assert rules.patterns[0].text == "foo"
    assert rules.excluded("foo")
    assert rules.excluded("foo/bar")
    assert not rules.excluded("a/foo")
    assert not rules.excluded("foobar")


def test_trailing_slash_and_dot_segments_are_cleaned() -> None:
    rules = parse_dockerignore("foo/\n./a\nb/../c\n  d//e  \n")
    assert [p.text for p in rules.patterns] == ["foo", "a", "c", "d/e"]
    assert rules.excluded("foo")  # Docker's cleaning means a file named foo is excluded too
    assert rules.excluded("a/x")
    assert rules.excluded("c")
    assert not rules.excluded("b")
    assert rules.excluded("d/e")


def test_comments_blank_lines_bom_and_line_numbers() -> None:
    text = "\ufeff# first line comment\n\n   \n*.log\n# another\n!keep.log\n"
    rules = parse_dockerignore(text)
    assert [(p.text, p.exclusion, p.line) for p in rules.patterns] == [
        ("*.log", False, 4),
        ("keep.log", True, 6),
    ]
    # Only a '#' in the first column is a comment: Docker keeps " #x" as a pattern.
    assert parse_dockerignore(" #x\n").excluded("#x")


def test_context_root_is_never_excluded() -> None:
    rules = parse_dockerignore("**\n")
    assert not rules.excluded(".")
    assert not rules.excluded("")
    assert rules.excluded("anything")


def test_empty_rules_exclude_nothing() -> None:
    rules = IgnoreRules()
    assert not rules.excluded("a/b")
    assert not rules.may_include_below("a")


def test_lone_bang_is_invalid_with_file_and_line() -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_dockerignore("a\n!\n", source="ctx/.dockerignore")
    assert exc.value.line == 2
    assert str(exc.value).startswith("ctx/.dockerignore:2: ")
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("bad", ["[", "a[b", "x\\", "[]a]", "[a-]", "[^]"])
def test_malformed_pattern_is_invalid(bad: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        parse_dockerignore(f"ok\n{bad}\n")
    assert exc.value.line == 2
    assert "bad .dockerignore pattern" in exc.value.message


def test_may_include_below() -> None:
    rules = parse_dockerignore("*\n!src/keep\n!**/important\n")
    assert rules.may_include_below("docs")  # **/important could be anywhere
    rules = parse_dockerignore("*\n!src/*/keep\n")
    assert rules.may_include_below("src")
    assert rules.may_include_below("src/a")
    assert not rules.may_include_below("src/a/b")
    assert not rules.may_include_below("docs")
    # An exception overridden by a later pattern that covers the whole directory.
    rules = parse_dockerignore("*\n!src\nsrc/gen\n")
    assert rules.may_include_below("src")
    assert not rules.may_include_below("src/gen")
    # No exceptions at all: every excluded directory can be skipped.
    assert not parse_dockerignore("a\nb/**\n").may_include_below("a")


SEGMENTS = ["a", "b", "*", "a*", "?", "**", "[ab]"]
NAMES = ["a", "b", "ab"]


@st.composite
def rule_texts(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        segs = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3))
        bang = "!" if draw(st.booleans()) else ""
        lines.append(bang + "/".join(segs))
    return "\n".join(lines)


ALL_PATHS = ["/".join(parts) for n in range(1, 5) for parts in itertools.product(NAMES, repeat=n)]


@settings(max_examples=150, deadline=None)
@given(rule_texts())
def test_may_include_below_is_sound(text: str) -> None:
    """Skipping a directory that may_include_below rules out never drops a kept path."""
    rules = parse_dockerignore(text)
    for path in ALL_PATHS:
        if rules.excluded(path):
            continue
        parts = path.split("/")
        for n in range(1, len(parts)):
            parent = "/".join(parts[:n])
            if rules.excluded(parent):
                assert rules.may_include_below(parent), (text, parent, path)


@settings(max_examples=150, deadline=None)
@given(rule_texts())
def test_incremental_state_equals_full_match(text: str) -> None:
    rules = parse_dockerignore(text)
    for path in ALL_PATHS:
        parent, _, _ = path.rpartition("/")
        if not parent:
            continue
        state = rules.child_state(rules.state(parent), path)
        assert state == rules.state(path)
        assert rules.excluded_by(state) == rules.excluded(path)


def test_go_clean() -> None:
    assert go_clean("") == "."
    assert go_clean("./a/") == "a"
    assert go_clean("//a//b/../c") == "/a/c"
    assert go_clean("/..") == "/"
    assert go_clean("a/../..") == ".."


def test_compile_segment_is_go_filepath_match() -> None:
    assert compile_segment("*.txt").fullmatch(".hidden.txt")  # no dotfile special case
    assert compile_segment("?.go").fullmatch("a.go")
    assert not compile_segment("?.go").fullmatch("ab.go")
    assert compile_segment("[a-c]x").fullmatch("bx")
    assert compile_segment("[^a-c]x").fullmatch("dx")
    assert not compile_segment("[^a-c]x").fullmatch("ax")
    assert compile_segment("\\[x]").fullmatch("[x]")
    assert compile_segment("[\\]]").fullmatch("]")
    assert not compile_segment("[z-a]").fullmatch("m")  # an inverted range matches nothing
    with pytest.raises(PatternSyntaxError):
        compile_segment("[abc")


def test_has_wildcards_honours_escapes() -> None:
    assert has_wildcards("src/*.py")
    assert has_wildcards("a?")
    assert has_wildcards("[ab]")
    assert not has_wildcards("plain/path.txt")
    assert not has_wildcards("a\\*b")


def test_load_ignore_prefers_dockerfile_specific_file(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / ".dockerignore").write_text("generic\n")
    dockerfile = ctx / "Dockerfile"
    dockerfile.write_text("FROM scratch\n")

    rules, used = load_ignore(ctx, dockerfile)
    assert used == ctx / ".dockerignore"
    assert rules.excluded("generic")

    specific = ctx / "Dockerfile.dockerignore"
    specific.write_text("specific\n")
    rules, used = load_ignore(ctx, dockerfile)
    assert used == specific
    assert rules.excluded("specific")
    assert not rules.excluded("generic")


def test_load_ignore_with_dockerfile_elsewhere(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (tmp_path / "build").mkdir()
    dockerfile = tmp_path / "build" / "app.Dockerfile"
    dockerfile.write_text("FROM scratch\n")
    rules, used = load_ignore(ctx, dockerfile)
    assert used is None
    assert rules.patterns == ()
    (tmp_path / "build" / "app.Dockerfile.dockerignore").write_text("*.tmp\n")
    rules, used = load_ignore(ctx, dockerfile)
    assert used == tmp_path / "build" / "app.Dockerfile.dockerignore"
    assert rules.excluded("x.tmp")


def test_load_ignore_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        load_ignore(tmp_path, tmp_path / "Dockerfile")
    (tmp_path / ".dockerignore").write_text("ok\n[bad\n")
    with pytest.raises(InvalidInput) as exc:
        load_ignore(tmp_path, tmp_path / "Dockerfile")
    assert exc.value.file == str(tmp_path / ".dockerignore")
    assert exc.value.line == 2
    (tmp_path / ".dockerignore").unlink()
    (tmp_path / ".dockerignore").mkdir()
    with pytest.raises(InvalidInput, match="Is a directory"):
        load_ignore(tmp_path, tmp_path / "Dockerfile")


_segment = st.text(alphabet="ab.*?[]!/\\py", min_size=1, max_size=6)
_path = st.lists(st.text(alphabet="ab.cpy", min_size=1, max_size=5), min_size=1, max_size=4).map(
    "/".join
)


@settings(max_examples=400, deadline=None)
@given(
    texts=st.lists(
        st.one_of(_segment, _segment.map(lambda s: "**/*" + s), st.sampled_from(["**/*.pyc"])),
        min_size=1,
        max_size=4,
    ),
    negate=st.lists(st.booleans(), min_size=4, max_size=4),
    paths=st.lists(_path, min_size=1, max_size=8),
)
def test_the_walkers_matchers_agree_with_match(
    texts: list[str], negate: list[bool], paths: list[str]
) -> None:
    """What a walk uses (each pattern's ``test``, made once; ``**/*LITERAL`` as a suffix test;
    ``child_state``/``excluded_by``) answers as ``Pattern.matches`` and the rule "the last
    matching pattern decides" do."""
    pats = []
    for text, neg in zip(texts, negate, strict=False):
        try:
            pats.append(Pattern.compile(text, exclusion=neg))
        except PatternSyntaxError:
            continue
    rules = IgnoreRules(tuple(pats))
    for rel in paths:
        for p in pats:
            assert p.test is not None and p.test(rel) == p.matches(rel)
        parent = rel.rpartition("/")[0]
        above = rules.state(parent) if parent else (False,) * len(pats)
        state = rules.child_state(above, rel)
        assert state == tuple(p.matches_or_parent(rel) for p in pats)
        last = [p for p, m in zip(pats, state, strict=True) if m]
        assert rules.excluded_by(state) == (bool(last) and not last[-1].exclusion)
