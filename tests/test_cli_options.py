"""Command-line values lbuild does not implement are refused, naming what (issue 9 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.solve.run import secrets_from
from cache.errors import InvalidInput, Unsupported


def test_secret_known_keys(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("x")
    assert secrets_from([f"id=a,src={f}", f"type=file,id=b,source={f}"]) == {"a": f, "b": f}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("id=a,src={f},mode=0400", "unexpected key 'mode'"),
        ("id=a,src={f},required", "field 'required' must be a key=value pair"),
        ("id=a,src={f},type=ssh", "unsupported secret type 'ssh'"),
        ("src={f}", "id= is required"),
    ],
)
def test_secret_bad_fields_are_refused(tmp_path: Path, spec: str, message: str) -> None:
    f = tmp_path / "s"
    f.write_text("x")
    with pytest.raises(InvalidInput, match=message):
        secrets_from([spec.format(f=f)])


def test_env_secret_not_supported_yet() -> None:
    with pytest.raises(Unsupported, match="environment secrets are not supported yet"):
        secrets_from(["id=a,env=HOME"])
    with pytest.raises(Unsupported):
        secrets_from(["id=a,type=env"])


def test_dockerignore_inverted_class_range_is_refused() -> None:
    # moby/patternmatcher compiles classes with Go's regexp, which rejects `l-O`: Docker fails
    # the build; COPY wildcards (filepath.Match) accept it and match nothing.
    from builder.frontend.dockerignore import compile_segment, parse_dockerignore

    with pytest.raises(InvalidInput, match=r"\.dockerignore:2: bad \.dockerignore pattern "
                       r"'\[Local-Only\]': invalid character class range: `l-O`"):
        parse_dockerignore("ok\n[Local-Only]/\n", source=".dockerignore")
    assert parse_dockerignore("[a-c]x\n").excluded("bx")
    assert compile_segment("[Local-Only]").fullmatch("L")
    assert not compile_segment("[l-O]").fullmatch("m")
