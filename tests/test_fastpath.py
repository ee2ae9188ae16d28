"""The memo's second use: the plan's DAG, stored with its topological order, lets a rebuild
with the same Dockerfile, arguments and contexts skip ordering it again.  The order is
networkx's lexicographical topological order, computed without importing networkx (a build
never imports it).

The stored order is used only when the stored nodes and edges are exactly the new plan's:
tampering with the memo must send the build back to ordering, never to a wrong order.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from util import ROOT, lbuild, manifest_digest, write_files, write_memo_ready

from cache.errors import InvalidInput

DOCKERFILE = """\
FROM scratch AS libs
COPY lib/ /lib/
FROM scratch
COPY --link app/ /app/
COPY --from=libs /lib /opt/lib
COPY conf.txt /etc/conf.txt
ENV MODE=prod
"""


def make_ctx(ctx: Path) -> None:
    write_files(
        ctx,
        {
            "Dockerfile": DOCKERFILE,
            "lib/a.py": "a = 1\n",
            "app/main.py": "print(1)\n",
            "conf.txt": "x\n",
        },
    )


def build_in_process(ctx: Path, home: Path, out: Path) -> tuple[bool, str]:
    """Run the CLI's build in a fresh interpreter; return (networkx imported?, stderr)."""
    code = (
        "import sys\n"
        "from builder.cli import main\n"
        f"rc = main(['build', {str(ctx)!r}, '--home', {str(home)!r}, '--progress', 'plain',"
        f" '--output', 'type=oci,dest={out}'])\n"
        "assert rc == 0, rc\n"
        "print('networkx' in sys.modules)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip() == "True", p.stderr


def test_an_edit_rebuild_takes_the_stored_order(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    make_ctx(ctx)
    home = tmp_path / "home"
    imported, _ = build_in_process(ctx, home, tmp_path / "o1")
    assert not imported  # nothing stored yet: the DAG is ordered, without networkx
    memos = list((home / "memo").glob("*.json"))
    assert len(memos) == 1
    stored = json.loads(memos[0].read_text())["dag"]
    assert stored["order"] and len(stored["nodes"]) == len(stored["order"])

    (ctx / "app" / "main.py").write_text("print(2)\n")
    imported, err = build_in_process(ctx, home, tmp_path / "o2")
    assert not imported
    assert "1/5 steps cached" in err, err  # the --link COPY and the steps after it rebuilt
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'ref'}", home=home)
    assert manifest_digest(tmp_path / "o2") == manifest_digest(tmp_path / "ref")


def test_a_stored_dag_that_differs_is_not_used(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    make_ctx(ctx)
    home = tmp_path / "home"
    build_in_process(ctx, home, tmp_path / "o1")
    (memo,) = list((home / "memo").glob("*.json"))
    doc = json.loads(memo.read_text())
    # a stored DAG with one dependency missing (and so an order that would run a step
    # before the stage it copies from)
    doc["dag"]["edges"] = doc["dag"]["edges"][1:]
    doc["dag"]["order"] = list(reversed(doc["dag"]["order"]))
    memo.write_text(json.dumps(doc))

    (ctx / "conf.txt").write_text("y\n")
    imported, _ = build_in_process(ctx, home, tmp_path / "o2")
    assert not imported  # ordered again (test_the_stored_order_is_networkx_order: not taken)
    lbuild("build", ctx, "--no-cache", "--output", f"type=oci,dest={tmp_path / 'ref'}", home=home)
    assert manifest_digest(tmp_path / "o2") == manifest_digest(tmp_path / "ref")


def test_the_stored_order_is_networkx_order(tmp_path: Path) -> None:
    import networkx as nx

    from builder.frontend import dockerfile as df
    from builder.frontend.dockerignore import IgnoreRules
    from builder.plan.context import BuildContext, hash_file
    from builder.plan.dag import PlanOptions
    from builder.plan.planner import make_plan

    ctx = tmp_path / "ctx"
    make_ctx(ctx)
    dockerfile = df.load(ctx / "Dockerfile")
    popts = PlanOptions(
        build_args={}, target=None, epoch=0, keep_mtime=False, platform="linux/amd64"
    )

    def plan(known: dict[str, object] | None) -> object:
        return make_plan(
            dockerfile,
            BuildContext(ctx, IgnoreRules()),
            popts,
            lambda ref: None,
            lambda path, st: hash_file(path, st),
            known,
        )

    fresh = plan(None)
    assert fresh.known_order is None  # type: ignore[attr-defined]
    order = fresh.topo_ids()  # type: ignore[attr-defined]
    assert order == list(nx.lexicographical_topological_sort(fresh.graph))  # type: ignore[attr-defined]
    stored = {**fresh.dag.to_json(), "order": order}  # type: ignore[attr-defined]
    again = plan(json.loads(json.dumps(stored)))  # as read back from the memo file
    assert again.known_order == order  # type: ignore[attr-defined]
    assert plan({**stored, "nodes": stored["nodes"][:-1]}).known_order is None  # type: ignore[attr-defined]
    for bad_order in (None, "x", order[:-1], [*order[:-1], "0:9"]):
        assert plan({**stored, "order": bad_order}).known_order is None  # type: ignore[attr-defined]


def test_a_noop_build_imports_no_other_command(tmp_path: Path) -> None:
    """``lbuild build`` builds only its own subparser: a no-op loads none of the modules of
    warm, diff/repro-check, pull/push or cache export/import (``-X importtime`` tells)."""
    import os

    ctx, home = tmp_path / "ctx", tmp_path / "home"
    # so that the first build writes a memo the second can use
    write_memo_ready(ctx, {"Dockerfile": "FROM scratch\nCOPY a /a\n", "a": "a\n"})
    lbuild("build", ctx, "--progress", "plain", home=home)
    env = dict(os.environ, LBUILD_HOME=str(home))
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "builder", "build", str(ctx), "-q"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    loaded = {
        line.rsplit("|", 1)[1].strip()
        for line in p.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"builder.cli", "builder.noop"} <= loaded
    assert "builder.api" not in loaded  # the no-op path answered: the builder never loaded
    others = sorted(
        m
        for m in loaded
        if m in ("builder.warm", "builder.registrycmd", "builder.sharecmd")
        or m.startswith("builder.compare")
    )
    assert others == []


def test_the_order_is_networkx_lexicographical_order_on_random_dags() -> None:
    import random

    import networkx as nx

    from builder.plan.dag import Dag, lexicographic_order

    rng = random.Random(13)
    for _ in range(200):
        ids = [f"{rng.randrange(4)}:{n}" for n in range(rng.randrange(1, 30))]
        ids = list(dict.fromkeys(ids))
        rng.shuffle(ids)
        dag = Dag()
        for n in ids:
            dag.add_node(n)
        for i, v in enumerate(ids):  # edges only forward in this shuffled order: acyclic
            for u in rng.sample(ids[:i], min(i, rng.randrange(4))):
                dag.add_edge(u, v)
                if rng.random() < 0.2:
                    dag.add_edge(u, v)  # a duplicate edge, as planning may add
        g = nx.DiGraph()
        g.add_nodes_from(dag.nodes)
        g.add_edges_from(dag.edges)
        assert lexicographic_order(dag) == list(nx.lexicographical_topological_sort(g))
    cyclic = Dag()
    cyclic.add_edge("a", "b")
    cyclic.add_edge("b", "a")
    with pytest.raises(InvalidInput, match="circle"):
        lexicographic_order(cyclic)
