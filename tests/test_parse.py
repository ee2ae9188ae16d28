"""Tests for builder.frontend.dockerfile: golden parse fixtures, negative fixtures, ARG/ENV resolution.

Golden cases live in fixtures/parse/<case>/: ``Dockerfile`` and ``result.json`` (the parsed
stages and, when ``inputs.json`` gives build args and a base env, the resolved steps).
``LBUILD_REGEN=1`` rewrites result.json files; review every diff before committing it.
Negative cases live in fixtures/parse-negative/<case>/ with the exact message in error.txt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from builder.frontend import dockerfile as df
from cache.errors import InvalidInput, NotFound

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
POSITIVE = sorted(p for p in (FIXTURES / "parse").iterdir() if p.is_dir())
NEGATIVE = sorted(p for p in (FIXTURES / "parse-negative").iterdir() if p.is_dir())

# Fixed platform ARGs so golden files do not depend on the machine running the tests.
AMD64 = {
    "BUILDPLATFORM": "linux/amd64",
    "BUILDOS": "linux",
    "BUILDARCH": "amd64",
    "BUILDVARIANT": "",
    "TARGETPLATFORM": "linux/amd64",
    "TARGETOS": "linux",
    "TARGETARCH": "amd64",
    "TARGETVARIANT": "",
}


def _resolved_json(dockerfile: df.Dockerfile, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Resolve every stage; record each step and the state only where it changed."""
    build_args: dict[str, str] = inputs["build_args"]
    out = []
    for stage in dockerfile.stages:
        steps = []
        previous: dict[str, Any] = {}
        resolved = df.resolve_stage(
            dockerfile, stage, inputs["base_env"], build_args, platform_args=AMD64
        )
        for r in resolved:
            step = df.resolved_to_json(r)
            entry: dict[str, Any] = {"instruction": step["instruction"]}
            entry["instruction"].pop("original")
            for key in ("env", "args", "run_env"):
                if step[key] != previous.get(key):
                    entry[key] = step[key]
                    previous[key] = step[key]
            steps.append(entry)
        out.append(
            {
                "base": df.resolve_base(dockerfile, stage, build_args, platform_args=AMD64),
                "platform": df.resolve_platform(dockerfile, stage, build_args, platform_args=AMD64),
                "steps": steps,
            }
        )
    return out


def _actual(case: Path) -> dict[str, Any]:
    dockerfile = df.parse((case / "Dockerfile").read_text(encoding="utf-8"), "Dockerfile")
    result: dict[str, Any] = {"parsed": df.to_json(dockerfile)}
    inputs_file = case / "inputs.json"
    if inputs_file.exists():
        inputs = json.loads(inputs_file.read_text())
        result["resolved"] = _resolved_json(dockerfile, inputs)
        result["unused_build_args"] = list(df.unused_build_args(dockerfile, inputs["build_args"]))
    return result


def test_fixture_counts() -> None:
    assert len(POSITIVE) >= 12
    assert len(NEGATIVE) >= 8


@pytest.mark.parametrize("case", POSITIVE, ids=[p.name for p in POSITIVE])
def test_golden(case: Path) -> None:
    actual = _actual(case)
    golden = case / "result.json"
    if os.environ.get("LBUILD_REGEN"):
        golden.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
    assert golden.exists(), f"missing {golden}; run with LBUILD_REGEN=1 and review it"
    assert actual == json.loads(golden.read_text())


@pytest.mark.parametrize("case", NEGATIVE, ids=[p.name for p in NEGATIVE])
def test_negative(case: Path) -> None:
    text = (case / "Dockerfile").read_text(encoding="utf-8")
    expected = (case / "error.txt").read_text().rstrip("\n")
    with pytest.raises(InvalidInput) as info:
        df.parse(text, "Dockerfile")
    assert str(info.value) == expected
    assert info.value.exit_code == 2


# ----------------------------------------------------------------------------- structure


def test_stage_lookup_and_types() -> None:
    dockerfile = df.parse("FROM a AS Build\nRUN x\nFROM build\nCOPY --from=BUILD /a /b\n")
    assert [s.name for s in dockerfile.stages] == ["build", None]
    assert dockerfile.stage("BUILD") is dockerfile.stages[0]
    assert dockerfile.stage("1") is dockerfile.stages[1]
    assert dockerfile.stage("nope") is None
    copy = dockerfile.stages[1].instructions[0]
    assert isinstance(copy, df.Copy)
    assert copy.keyword == "COPY"
    assert copy.from_ == "BUILD"  # raw: the planner matches stage names case-insensitively


def test_instructions_are_frozen() -> None:
    run = df.parse("FROM a\nRUN x\n").stages[0].instructions[0]
    with pytest.raises(AttributeError):
        run.line = 3  # type: ignore[misc]


def test_heredoc_chomped_data() -> None:
    text = "FROM a\nCOPY <<-EOF /x\n\t\tindented\n\tEOF\n"
    copy = df.parse(text).stages[0].instructions[0]
    assert isinstance(copy, df.Copy)
    (doc,) = copy.heredocs
    assert doc.content == "\t\tindented\n"
    assert doc.chomp and doc.data == "indented\n"


def test_add_is_copy_with_is_add() -> None:
    add = df.parse("FROM a\nADD https://example.com/f /f\n").stages[0].instructions[0]
    assert isinstance(add, df.Copy)
    assert add.is_add and add.keyword == "ADD"
    assert add.sources == ("https://example.com/f",)


def test_parse_error_line_with_many_lines() -> None:
    text = "FROM a\n" + "RUN true\n" * 200 + "LABEL onlykey\n" + "RUN true\n" * 50
    with pytest.raises(InvalidInput) as info:
        df.parse(text, "Dfile")
    assert info.value.file == "Dfile"
    assert info.value.line == 202


def test_load_errors(tmp_path: Path) -> None:
    missing = tmp_path / "Dockerfile"
    with pytest.raises(NotFound, match=r"Dockerfile not found: .*Dockerfile"):
        df.load(missing)
    with pytest.raises(InvalidInput, match="it is a directory"):
        df.load(tmp_path)
    missing.write_bytes(b"FROM a\nRUN \xff\n")
    with pytest.raises(InvalidInput, match="not UTF-8"):
        df.load(missing)


def test_load_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "build.Dockerfile"
    path.write_text("FROM a\nBOGUS x\n")
    with pytest.raises(InvalidInput) as info:
        df.load(path)
    assert str(info.value) == f"{path}:2: unknown instruction: BOGUS"
    path.write_text("FROM a\nRUN x\n")
    assert df.load(path).filename == str(path)


# ----------------------------------------------------------------------------- resolution


def _resolve(
    text: str, build_args: dict[str, str] | None = None, base_env: list[str] | None = None
) -> tuple[df.Resolved, ...]:
    dockerfile = df.parse(text)
    return df.resolve_stage(
        dockerfile, dockerfile.stages[-1], base_env or [], build_args or {}, platform_args=AMD64
    )


def _workdirs(resolved: tuple[df.Resolved, ...]) -> list[str]:
    return [r.instruction.path for r in resolved if isinstance(r.instruction, df.Workdir)]


def test_meta_arg_only_in_from_unless_redeclared() -> None:
    text = "ARG V=global\nFROM img:$V\nWORKDIR /$V\nARG V\nWORKDIR /$V\n"
    dockerfile = df.parse(text)
    assert df.resolve_base(dockerfile, dockerfile.stages[0], {}) == "img:global"
    assert _workdirs(_resolve(text)) == ["/", "/global"]
    assert _workdirs(_resolve(text, {"V": "cli"})) == ["/", "/cli"]


def test_build_arg_overrides_only_declared_args() -> None:
    resolved = _resolve("FROM a\nARG D=default\nWORKDIR /$D/$U\n", {"D": "cli", "U": "undeclared"})
    assert _workdirs(resolved) == ["/cli/"]
    dockerfile = df.parse("FROM a\nARG D\n")
    assert df.unused_build_args(dockerfile, {"D": "1", "U": "2", "HTTP_PROXY": "p"}) == ("U",)


def test_env_overrides_arg_and_later_arg_wins() -> None:
    text = "FROM a\nARG V=arg\nENV V=env\nWORKDIR /$V\nARG V=again\nWORKDIR /$V\n"
    resolved = _resolve(text)
    assert _workdirs(resolved) == ["/env", "/again"]
    assert dict(resolved[-1].env)["V"] == "env"  # the image keeps the ENV value
    assert dict(resolved[-1].run_env)["V"] == "again"


def test_env_values_see_the_state_before_the_instruction() -> None:
    resolved = _resolve("FROM a\nENV A=1 B=$A\nARG X=1 Y=${X}2\n", base_env=["A=0"])
    # PATH is added to the base env (BuildKit does so when the base image sets none).
    assert resolved[0].env == (("A", "1"), ("PATH", df.DEFAULT_PATH), ("B", "0"))
    assert resolved[1].args == (("X", "1"), ("Y", "12"))


def test_replaced_env_keeps_its_place() -> None:
    resolved = _resolve("FROM a\nENV PATH=/x:$PATH Z=1\n", base_env=["PATH=/bin", "HOME=/root"])
    assert resolved[0].env == (("PATH", "/x:/bin"), ("HOME", "/root"), ("Z", "1"))


def test_no_expansion_in_run_cmd_entrypoint_healthcheck_shell_onbuild() -> None:
    text = (
        'FROM a\nARG N=v\nRUN echo $N\nRUN ["echo", "$N"]\nCMD $N\nENTRYPOINT ["$N"]\n'
        'HEALTHCHECK CMD $N\nSHELL ["$N"]\nONBUILD RUN $N\nMAINTAINER $N\n'
    )
    resolved = _resolve(text)
    parsed = df.parse(text).stages[0].instructions
    assert [r.instruction for r in resolved[1:]] == list(parsed[1:])


def test_expanded_instructions() -> None:
    text = (
        "FROM a\nARG N=v\nENV D=/srv\nCOPY --from=$N --chown=$N --chmod=$N $N.txt $D/\n"
        "EXPOSE $P 80\nUSER $N\nSTOPSIGNAL $N\nVOLUME $D\nLABEL $N=$D\n"
    )
    resolved = _resolve(text, {"N": "x"})
    copy, expose, user, signal, volume, label = (r.instruction for r in resolved[2:])
    assert isinstance(copy, df.Copy)
    assert (copy.from_, copy.chown, copy.chmod) == ("x", "x", "x")
    assert (copy.sources, copy.dest) == (("x.txt",), "/srv/")
    assert isinstance(expose, df.Expose) and expose.ports == ("80",)
    assert isinstance(user, df.User) and user.user == "x"
    assert isinstance(signal, df.Stopsignal) and signal.signal == "x"
    assert isinstance(volume, df.Volume) and volume.paths == ("/srv",)
    assert isinstance(label, df.Label) and label.pairs == (("x", "/srv"),)


def test_expose_splits_expanded_words() -> None:
    resolved = _resolve('FROM a\nARG P="80 443/tcp"\nEXPOSE $P "8080"\n')
    expose = resolved[-1].instruction
    assert isinstance(expose, df.Expose)
    assert expose.ports == ("80", "443/tcp", "8080")


def test_copy_heredoc_expansion_respects_quoted_name() -> None:
    text = "FROM a\nARG N=v\nCOPY <<A <<'B' /d/\n\"$N\" \\$N\nA\n$N\nB\n"
    copy = _resolve(text)[-1].instruction
    assert isinstance(copy, df.Copy)
    assert [(h.name, h.content) for h in copy.heredocs] == [("A", '"v" $N\n'), ("B", "$N\n")]


def test_expansion_errors_carry_the_line() -> None:
    with pytest.raises(InvalidInput) as info:
        _resolve("FROM a\nRUN true\nWORKDIR ${MISSING:?must be set}\n")
    assert str(info.value) == (
        'Dockerfile:3: failed to process "${MISSING:?must be set}": MISSING: must be set'
    )
    dockerfile = df.parse("ARG T\nFROM $T\n")
    with pytest.raises(InvalidInput, match=r"Dockerfile:2: base name \(\$T\) should not be blank"):
        df.resolve_base(dockerfile, dockerfile.stages[0], {})


def test_platform_args_need_declaration_in_stage() -> None:
    text = "FROM --platform=$BUILDPLATFORM a:$TARGETARCH\nWORKDIR /$TARGETARCH\nARG TARGETARCH\nWORKDIR /$TARGETARCH\n"
    dockerfile = df.parse(text)
    stage = dockerfile.stages[0]
    assert df.resolve_base(dockerfile, stage, {}, platform_args=AMD64) == "a:amd64"
    assert df.resolve_platform(dockerfile, stage, {}, platform_args=AMD64) == "linux/amd64"
    assert _workdirs(_resolve(text)) == ["/", "/amd64"]


def test_host_platform_args_look_like_oci_platforms() -> None:
    args = df.host_platform_args()
    assert args["TARGETOS"] == args["BUILDOS"] == "linux"
    assert args["TARGETPLATFORM"].startswith(f"linux/{args['TARGETARCH']}")
    assert args["BUILDPLATFORM"] == args["TARGETPLATFORM"]


def test_path_added_when_base_has_none() -> None:
    resolved = _resolve("FROM scratch\nENV A=1\n")
    assert resolved[0].env == (("PATH", df.DEFAULT_PATH), ("A", "1"))


def test_run_mounts_are_expanded_but_not_the_command() -> None:
    run = _resolve("FROM a\nARG ID=c1\nRUN --mount=type=cache,id=$ID,target=/c echo $ID\n")[-1]
    assert isinstance(run.instruction, df.Run)
    assert run.instruction.mounts == ("type=cache,id=c1,target=/c",)
    assert run.instruction.command == ("echo $ID",)
    assert dict(run.run_env)["ID"] == "c1"
