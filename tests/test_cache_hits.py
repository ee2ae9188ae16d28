"""Cache correctness: no false hits after any edit, no false misses after a move.

A false hit (a stale layer served after an input changed) is the worst bug a build cache
can have, so the first test drives random sequences of edits through real builds and checks
every incremental result digest for digest against a ``--no-cache`` build from a separate,
fresh home.  The builds go through the real command line (``builder.cli.main``) in this
process: a build costs ~40 ms that way instead of ~500 ms for a new interpreter, which is
what lets hypothesis try many edit sequences within the test budget.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.util import lbuild, manifest_digest, write_files

EPOCH = "1700000000"

DOCKERFILE = """\
ARG FLAVOR=plain
FROM scratch AS deps
ARG FLAVOR
ENV FLAVOR=${FLAVOR}
WORKDIR /deps
COPY lib/ ./lib/
COPY --link app/data /data
WORKDIR sub
COPY lib/x.txt .

FROM scratch AS final
ARG FLAVOR
WORKDIR /app
COPY --link app/ /app/
COPY link app/cur ./links/
COPY --from=deps /deps /deps
COPY --from=deps /data /data2
ENV MODE=${FLAVOR}
LABEL flavor=${FLAVOR}
COPY . /ctx/
"""

BASE_FILES: dict[str, str | bytes] = {
    "Dockerfile": DOCKERFILE,
    ".dockerignore": "*.log\n",
    "app/main.py": "print('main')\n",
    "app/util.py": "def util():\n    return 1\n",
    "app/run.sh": "#!/bin/sh\necho run\n",
    "app/data/conf.txt": "key=value\n",
    "app/data/blob.bin": bytes(range(256)),
    "lib/x.txt": "x\n",
    "lib/y.txt": "yy\n",
    "notes.log": "ignored\n",
    "top.txt": "top\n",
}

# Files the Dockerfile or a symlink names: edited, never deleted or renamed away, so that
# most sequences keep building (a failing build is still compared: both must fail alike).
PROTECTED = frozenset({"Dockerfile", "app/main.py", "app/util.py", "lib/x.txt", "link", "app/cur"})

IGNORES = (
    "",
    "*.log\n",
    "*.log\napp/data/*.txt\n",
    "**/*.bin\n",
    "**/*.py\n!app/*.py\n",
    "lib/*\n!lib/x.txt\n",
    "top.txt\nnotes.log\n",
)
LINK_TARGETS = ("app/main.py", "app/util.py", "lib/x.txt", "./top.txt")
CUR_TARGETS = ("util.py", "main.py", "run.sh", "../lib/x.txt")
DIRS = (".", "app", "app/data", "lib", "new")
EXTS = (".py", ".txt", ".log", ".bin", "")
MODES = (0o644, 0o755, 0o600, 0o700, 0o444)
DIR_MODES = (0o755, 0o700, 0o750)
FLAVORS = (None, "a", "b")


def make_context(root: Path) -> None:
    """The base context: files, dirs, an ignored file, two symlinks, an executable."""
    write_files(root, BASE_FILES)
    (root / "app/run.sh").chmod(0o755)
    os.symlink("app/main.py", root / "link")
    os.symlink("util.py", root / "app/cur")


@contextlib.contextmanager
def source_date_epoch() -> Iterator[None]:
    """SOURCE_DATE_EPOCH fixed for in-process builds, restored afterwards."""
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old


@dataclass(frozen=True)
class Outcome:
    """A build's exit code, image digest (None on failure) and progress events."""

    rc: int
    digest: str | None
    events: tuple[dict[str, Any], ...]
    stderr: str


def build_inproc(ctx: Path, home: Path, out: Path, *extra: str) -> Outcome:
    """Run ``lbuild build`` through the real CLI entry point in this process."""
    from builder.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    if out.exists():
        shutil.rmtree(out)
    args = [
        "build",
        str(ctx),
        "--home",
        str(home),
        "--progress",
        "json",
        "--output",
        f"type=oci,dest={out}",
        *extra,
    ]
    with (
        source_date_epoch(),
        contextlib.redirect_stdout(stdout),
        contextlib.redirect_stderr(stderr),
    ):
        rc = main(args)
    events = tuple(json.loads(line) for line in stdout.getvalue().splitlines() if line.strip())
    digest = manifest_digest(out) if rc == 0 else None
    if rc == 0:
        done = [e for e in events if e.get("event") == "done"]
        assert done and done[-1]["digest"] == digest, "the last event must name the image digest"
    return Outcome(rc, digest, events, stderr.getvalue())


def files_of(root: Path) -> list[str]:
    """Regular files of the context (rel paths, sorted)."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                out.append(p.relative_to(root).as_posix())
    return sorted(out)


def replace_symlink(path: Path, target: str) -> None:
    tmp = path.with_name(path.name + ".tmp-link")
    os.symlink(target, tmp)
    os.replace(tmp, path)


def apply_edit(ctx: Path, data: st.DataObject, flavor: str | None) -> tuple[str, str | None]:
    """Apply one random edit to ``ctx``; returns a description and the new build-arg value."""
    kind = data.draw(
        st.sampled_from(
            ("content", "content", "chmod", "add", "delete", "rename", "symlink", "ignore", "arg")
        )
    )
    files = [f for f in files_of(ctx) if f not in ("Dockerfile", ".dockerignore")]
    free = [f for f in files if f not in PROTECTED]
    if kind == "content":
        rel = data.draw(st.sampled_from(files))
        p = ctx / rel
        before = p.stat()
        same_size = data.draw(st.booleans())
        size = before.st_size if same_size else data.draw(st.integers(0, 300))
        body = data.draw(st.binary(min_size=size, max_size=size))
        p.write_bytes(body)
        keep_mtime = data.draw(st.booleans())
        if keep_mtime:  # what `touch -r`, rsync -t or tar x do: only ctime tells
            os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
        return f"content {rel} size={size} keep_mtime={keep_mtime}", flavor
    if kind == "chmod":
        dirs = [d for d in DIRS if (ctx / d).is_dir()]
        rel = data.draw(st.sampled_from(files + dirs))
        mode = data.draw(st.sampled_from(DIR_MODES if (ctx / rel).is_dir() else MODES))
        (ctx / rel).chmod(mode)
        return f"chmod {rel} {mode:o}", flavor
    if kind == "add":
        d = data.draw(st.sampled_from(DIRS))
        name = data.draw(st.sampled_from(("n1", "n2", "main", "x", "conf"))) + data.draw(
            st.sampled_from(EXTS)
        )
        rel = name if d == "." else f"{d}/{name}"
        if (ctx / rel).is_symlink() or (ctx / rel).is_dir() or rel in PROTECTED:
            return f"add {rel} skipped", flavor
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_bytes(data.draw(st.binary(max_size=64)))
        return f"add {rel}", flavor
    if kind == "delete":
        if not free:
            return "delete skipped", flavor
        rel = data.draw(st.sampled_from(free))
        (ctx / rel).unlink()
        return f"delete {rel}", flavor
    if kind == "rename":
        if not free:
            return "rename skipped", flavor
        src = data.draw(st.sampled_from(free))
        # over another file (same path, other inode, its mtime kept) or to a new name
        others = [f for f in free if f != src]
        if len(others) > 0 and data.draw(st.booleans()):
            dst = data.draw(st.sampled_from(others))
        else:
            d = data.draw(st.sampled_from(DIRS))
            dst = f"{d}/moved{Path(src).suffix}".removeprefix("./")
            if (ctx / dst).exists() and dst in PROTECTED:
                return "rename skipped", flavor
        (ctx / dst).parent.mkdir(parents=True, exist_ok=True)
        os.rename(ctx / src, ctx / dst)
        return f"rename {src} -> {dst}", flavor
    if kind == "symlink":
        if data.draw(st.booleans()):
            target = data.draw(st.sampled_from(LINK_TARGETS))
            replace_symlink(ctx / "link", target)
            return f"link -> {target}", flavor
        target = data.draw(st.sampled_from(CUR_TARGETS))
        replace_symlink(ctx / "app/cur", target)
        return f"app/cur -> {target}", flavor
    if kind == "ignore":
        text = data.draw(st.sampled_from(IGNORES))
        (ctx / ".dockerignore").write_text(text)
        return f".dockerignore = {text!r}", flavor
    new = data.draw(st.sampled_from(FLAVORS))
    return f"--build-arg FLAVOR={new}", new


def arg_flags(flavor: str | None) -> tuple[str, ...]:
    return () if flavor is None else ("--build-arg", f"FLAVOR={flavor}")


@pytest.fixture(scope="module")
def aged_contexts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Contexts whose files are all older than the racy window (one sleep for all of them).

    A fresh file is re-hashed on every build and stops the no-op memo from being written,
    so with only fresh contexts the stat index rows and the memo would never be trusted;
    with an aged context the first build records both and the first edit must beat them.
    """
    root = tmp_path_factory.mktemp("aged")
    pool = []
    for i in range(24):
        make_context(root / f"ctx{i}")
        pool.append(root / f"ctx{i}")
    time.sleep(2.2)
    return pool


@pytest.mark.slow
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), n_edits=st.integers(1, 4))
def test_no_false_hits(
    tmp_path: Path, aged_contexts: list[Path], data: st.DataObject, n_edits: int
) -> None:
    """After every edit the incremental image equals a clean build from a fresh home."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    home = work / "home"
    if aged_contexts:
        ctx = aged_contexts.pop()
    else:  # shrinking can outlast the pool; a fresh context still checks the racy path
        ctx = work / "ctx"
        make_context(ctx)
    flavor: str | None = None
    first = build_inproc(ctx, home, work / "out")
    assert first.rc == 0, first.stderr
    history: list[str] = []
    for i in range(n_edits):
        what, flavor = apply_edit(ctx, data, flavor)
        history.append(what)
        inc = build_inproc(ctx, home, work / "out", *arg_flags(flavor))
        ref = build_inproc(
            ctx, work / f"ref-home-{i}", work / f"ref-{i}", "--no-cache", *arg_flags(flavor)
        )
        assert ref.rc == inc.rc, (history, inc.stderr, ref.stderr)
        assert inc.digest == ref.digest, f"stale result after edits {history}"
        if ref.rc == 0:
            assert not any(e.get("cached") for e in ref.events if e.get("event") == "step_done")


def step_events(events: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "step_done"]


def test_rebuild_in_place_hits_everything(tmp_path: Path) -> None:
    """A no-op rebuild is all hits and the same digest (the base the other tests rely on)."""
    make_context(tmp_path / "ctx")
    a = build_inproc(tmp_path / "ctx", tmp_path / "home", tmp_path / "a")
    b = build_inproc(tmp_path / "ctx", tmp_path / "home", tmp_path / "b")
    assert a.rc == b.rc == 0
    assert a.digest == b.digest
    # two stages' identical `ARG FLAVOR` steps share a key: the second may hit the first
    assert sum(not e["cached"] for e in step_events(a.events)) >= len(step_events(a.events)) - 1
    done = step_events(b.events)
    assert len(done) == a.events[-1]["steps"] and all(e["cached"] for e in done)


def test_a_step_record_holds_the_inputs_its_key_hashes(tmp_path: Path) -> None:
    """Every step record keeps the canonical JSON its key is the blake3 of (the planner's own
    bytes, not a second encoding): a record can be checked against its key, and ``why``
    reads the same inputs."""
    import sqlite3

    import blake3

    make_context(tmp_path / "ctx")
    assert build_inproc(tmp_path / "ctx", tmp_path / "home", tmp_path / "a").rc == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "home" / "lbuild.db")) as db:
        rows = db.execute("SELECT key, inputs FROM steps").fetchall()
    steps = [(k, json.loads(i)) for k, i in rows]
    copies = [(k, i) for k, i in steps if i.get("op") in ("COPY", "ADD")]
    assert any(i.get("sources") for _, i in copies)  # a COPY from the context: every file
    for key, inputs in [(k, i) for k, i in rows if json.loads(i).get("op") != "LAYER"]:
        assert blake3.blake3(inputs.encode()).hexdigest() == key


@pytest.mark.slow
def test_stat_index_sees_edits_that_keep_size_and_mtime(tmp_path: Path) -> None:
    """With every file old enough to be in the stat index, edits that keep size and mtime
    (in place; by rename of another inode; chmod) are still seen."""
    from cache.index.statindex import StatIndex

    ctx, home = tmp_path / "ctx", tmp_path / "home"
    make_context(ctx)
    time.sleep(2.2)  # past the stat index's racy window: rows get recorded from now on
    first = build_inproc(ctx, home, tmp_path / "out")
    assert first.rc == 0, first.stderr
    targets = ("app/main.py", "lib/y.txt", "app/data/conf.txt")
    with StatIndex.open(home / "lbuild.db") as idx:
        for rel in targets:
            # proves the edits below go through a recorded row, not the racy re-hash path
            assert idx.lookup(ctx / rel, (ctx / rel).lstat()) is not None, rel

    def check(step: str) -> str:
        inc = build_inproc(ctx, home, tmp_path / "out")
        ref = build_inproc(
            ctx, tmp_path / f"ref-home-{step}", tmp_path / f"ref-{step}", "--no-cache"
        )
        assert inc.rc == ref.rc == 0, (inc.stderr, ref.stderr)
        assert inc.digest == ref.digest, f"stale layer after {step}"
        assert inc.digest is not None
        return inc.digest

    digests = {first.digest}
    # 1. same size, same mtime, same inode, same mode: only ctime differs
    p = ctx / "app/main.py"
    before = p.stat()
    p.write_text("print('MAIN')\n")
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = p.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    digests.add(check("in-place"))
    # 2. a new inode renamed over the file, same size and mtime
    p = ctx / "lib/y.txt"
    before = p.stat()
    (ctx / "y.new").write_text("YY\n")
    os.utime(ctx / "y.new", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.rename(ctx / "y.new", p)
    digests.add(check("rename-over"))
    # 3. mode only
    (ctx / "app/data/conf.txt").chmod(0o640)
    digests.add(check("chmod"))
    assert len(digests) == 4, "every edit must give a new image"


def scramble(root: Path, rng: random.Random) -> None:
    """New mtimes and a foreign owner on every path (symlinks included)."""
    for dirpath, dirs, names in os.walk(root):
        for n in [*dirs, *names]:
            p = Path(dirpath) / n
            t = rng.randrange(1_000_000_000, 1_900_000_000) * 1_000_000_000 + rng.randrange(10**9)
            os.utime(p, ns=(t, t), follow_symlinks=False)
            os.lchown(p, 4321, 4321)


@pytest.mark.slow
def test_no_false_misses_after_copying_the_context(tmp_path: Path) -> None:
    """The same context elsewhere (new path, inodes, mtimes, owner) is all hits, same digest."""
    ctx, home = tmp_path / "ctx", tmp_path / "home"
    make_context(ctx)
    env = {"SOURCE_DATE_EPOCH": EPOCH}
    a = lbuild(
        "build",
        ctx,
        "--progress",
        "json",
        "--output",
        f"type=oci,dest={tmp_path / 'a'}",
        "--build-arg",
        "FLAVOR=a",
        home=home,
        env=env,
    )
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(ctx, copy, symlinks=True)  # copy2: new inodes; mtimes first kept...
    scramble(copy, random.Random(3))  # ...then changed
    for rel in files_of(ctx):
        assert (ctx / rel).stat().st_ino != (copy / rel).stat().st_ino
        assert stat.S_IMODE((ctx / rel).stat().st_mode) == stat.S_IMODE((copy / rel).stat().st_mode)
    b = lbuild(
        "build",
        copy,
        "--progress",
        "json",
        "--output",
        f"type=oci,dest={tmp_path / 'b'}",
        "--build-arg",
        "FLAVOR=a",
        home=home,
        env=env,
    )
    ev_a = [json.loads(x) for x in a.stdout.splitlines()]
    ev_b = [json.loads(x) for x in b.stdout.splitlines()]
    assert sum(not e["cached"] for e in step_events(ev_a)) >= len(step_events(ev_a)) - 1
    done = step_events(ev_b)
    assert len(done) == ev_a[-1]["steps"] == len(step_events(ev_a)) > 10
    missed = [e["name"] for e in done if not e["cached"]]
    assert missed == [], f"false misses: {missed}"
    assert ev_b[-1]["event"] == "done" and ev_b[-1]["cached"] == ev_b[-1]["steps"]
    assert manifest_digest(tmp_path / "a") == manifest_digest(tmp_path / "b")


def test_edit_below_a_link_step_reaches_the_steps_after_it(tmp_path: Path) -> None:
    """Regression (found by test_no_false_hits): the chain key after a ``COPY --link`` was the
    link step's own key, so an edit below the link step left every later step a stale hit."""
    ctx, home = tmp_path / "ctx", tmp_path / "home"
    make_context(ctx)
    assert build_inproc(ctx, home, tmp_path / "out").rc == 0
    (ctx / "lib/y.txt").unlink()  # only `COPY lib/ ./lib/` (below the --link step) reads it
    inc = build_inproc(ctx, home, tmp_path / "out")
    ref = build_inproc(ctx, tmp_path / "ref-home", tmp_path / "ref", "--no-cache")
    assert inc.rc == ref.rc == 0
    assert inc.digest == ref.digest
    missed = {e["name"] for e in step_events(inc.events) if not e["cached"]}
    assert (
        "[deps 6/7] WORKDIR sub" in missed and "[final 5/9] COPY --from=deps /deps /deps" in missed
    )
