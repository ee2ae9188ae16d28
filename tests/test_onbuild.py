"""ONBUILD triggers run when the image or stage is used in FROM (issue 9 item 3).

BuildKit (dockerfile2llb ``initOnBuildTriggers``): the base's triggers are parsed one by one,
run before the stage's own instructions, and are not carried into the new image; a stage
used as a base gives its ONBUILD instructions.  Before this, triggers never ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from util import lbuild, tool, tree, umoci_unpack

from builder.frontend import dockerfile as df
from cache.errors import InvalidInput


def test_parse_triggers() -> None:
    copy, env = df.parse_triggers(["COPY a.txt /x", "ENV T=1"], "Dockerfile", 7)
    assert isinstance(copy, df.Copy) and copy.sources == ("a.txt",) and copy.line == 7
    assert isinstance(env, df.Env) and env.pairs == (("T", "1"),)
    with pytest.raises(InvalidInput, match=r"Dockerfile:3: ONBUILD trigger 'FROM x': "):
        df.parse_triggers(["FROM x"], "Dockerfile", 3)
    with pytest.raises(InvalidInput, match="MAINTAINER isn't allowed as an ONBUILD trigger"):
        df.parse_triggers(["MAINTAINER me"], "Dockerfile", 3)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("umoci"), reason="needs umoci")
def test_triggers_run_in_the_stage_or_image_that_uses_the_base(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a")
    (ctx / "b.txt").write_text("b")
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS base\n"
        "ONBUILD COPY a.txt /from-trigger.txt\n"
        "ONBUILD ENV T=1\n"
        "FROM base\n"
        "COPY b.txt /b.txt\n"
    )
    out = tmp_path / "out"
    lbuild("build", "-o", f"type=oci,dest={out}", ctx, home=home)
    assert set(tree(umoci_unpack(out, tmp_path / "u"))) == {"b.txt", "from-trigger.txt"}
    cfg = json.loads(tool("skopeo", "inspect", "--config", f"oci:{out}:latest").stdout)["config"]
    assert "T=1" in cfg["Env"] and not cfg.get("OnBuild")
    # an image built elsewhere (here: tagged in the store) carries triggers in its config
    (ctx / "Dockerfile").write_text("FROM scratch\nONBUILD COPY a.txt /img-trigger.txt\n")
    lbuild("build", "-t", "h6/onbuild-base", ctx, home=home)
    (ctx / "Dockerfile").write_text("FROM h6/onbuild-base\nCOPY b.txt /\n")
    out2 = tmp_path / "out2"
    lbuild("build", "-o", f"type=oci,dest={out2}", ctx, home=home)
    assert set(tree(umoci_unpack(out2, tmp_path / "u2"))) == {"b.txt", "img-trigger.txt"}
