"""Parser directives as BuildKit reads them (issue 11 item 15): a bad ``# escape=`` anywhere in
the directive block is BuildKit's one-line error (exit 2), never an internal error; a line that
is not a known directive ends the block, so an ``# escape=`` after it is a comment."""

from __future__ import annotations

from pathlib import Path

import pytest
from util import lbuild

from builder.frontend import dockerfile as df
from cache.errors import InvalidInput

BAD = "invalid escape token 'xx' does not match ` or \\"


@pytest.mark.parametrize(
    "text, line",
    [
        ("# escape=xx\nFROM scratch\n", 1),
        ("# syntax=docker/dockerfile:1\n# escape=xx\nFROM scratch\n", 2),
        ("# check=skip=all\n# escape=xx\nFROM scratch\n", 2),
        ("# syntax=a\n# check=error=true\n#escape = xx \nFROM scratch\n", 3),
    ],
)
def test_bad_escape_in_the_directive_block_is_buildkits_message(text: str, line: int) -> None:
    with pytest.raises(InvalidInput) as err:
        df.parse(text)
    assert str(err.value) == f"Dockerfile:{line}: {BAD}"


def test_escape_after_an_unknown_directive_or_comment_is_a_comment() -> None:
    for head in ("# foo=bar\n", "# a comment\n", "\n"):
        d = df.parse(head + "# escape=xx\nFROM scratch\nENV A=$B\n")
        assert d.escape == "\\"
        (step,) = df.resolve_stage(d, d.stages[0], [], {})
        assert dict(step.env)["A"] == ""


def test_escape_after_check_directive_applies() -> None:
    d = df.parse("# check=skip=all\n# escape=`\nFROM scratch\nENV A=`$B\nRUN a `\n  b\n")
    assert d.escape == "`"
    env_step, run_step = df.resolve_stage(d, d.stages[0], [], {})
    assert dict(env_step.env)["A"] == "$B"
    assert isinstance(run_step.instruction, df.Run) and run_step.instruction.line == 5


def test_duplicate_directive() -> None:
    with pytest.raises(InvalidInput, match=r"^Dockerfile:2: only one check parser directive"):
        df.parse("# check=a\n# check=b\nFROM scratch\n")


def test_cli_bad_escape_after_another_directive_exit_2(tmp_path: Path, home: Path) -> None:
    (tmp_path / "D2").write_text("# check=x\n# escape=xx\nFROM scratch\n")
    p = lbuild("build", "-f", tmp_path / "D2", tmp_path, home=home, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().endswith(f"D2:2: {BAD}")
    assert "internal error" not in p.stderr
