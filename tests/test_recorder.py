"""The index writer child (cache.index.recorder) and the build index over it (cache.index.buildindex).

Everything runs for real: the child is a real ``python -m cache.index.recorder`` process writing a
real SQLite file, read back through SQLAlchemy's ``Index``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from builder.api import build
from builder.options import BuildOptions, Output
from builder.progress import PlainReporter
from cache.errors import StoreError
from cache.index.buildindex import BuildIndex
from cache.index.recorder import NothingApplied, Recorder
from cache.index.records import Index, Site, StatEntry, StepRecord
from cache.types import MEDIA_TYPES, BlobInfo, Digest, StepKey

ROOT = Path(__file__).resolve().parents[1]


def key(n: int) -> StepKey:
    return StepKey(f"{n:064x}")


def dg(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def rec(n: int, *, diff: int | None = None) -> StepRecord:
    return StepRecord(
        key=key(n),
        diff_id=dg(diff) if diff is not None else None,
        layer_size=10 * n if diff is not None else 0,
        toc_digest=None,
        config_delta="{}",
        inputs=f'{{"n": {n}}}',
        dockerfile_id="df",
        stage="0",
        position=n,
        created=1.0,
        last_used=2.0,
        hits=0,
        build_seconds=0.5,
    )


def test_recorder_applies_every_write(tmp_path: Path) -> None:
    db = tmp_path / "lbuild.db"
    r = Recorder.start(db)
    r.call("put_step", rec(1, diff=11))
    r.call("put_step", rec(2))
    gz = BlobInfo(dg(40), 99, MEDIA_TYPES["gzip"])
    r.call("put_compressed", dg(11), "gzip", 3, "v1", gz)
    r.call("set_tag", "localhost/app:latest", dg(5), "{}", blobs=(dg(11), dg(40)), now=3.0)
    rows = [StatEntry(f"/ctx/f{n}", n, n, n, n, 0o100644, f"{n:064x}") for n in range(1500)]
    r.call("stat_put_many", rows)
    r.call("touch_steps", [key(1)], 7.0, sites=[Site("other", "1", 4)])
    r.sync()
    # after a sync, everything is committed and visible to another reader
    with Index.open(db) as index:
        assert index.get_step(key(1)) == StepRecord(
            **{**rec(1, diff=11).__dict__, "last_used": 7.0, "hits": 1}
        )
        assert index.get_step(key(2)) == rec(2)
        assert index.get_compressed(dg(11), "gzip", 3, "v1") == gz
        tag = index.get_tag("localhost/app:latest")
        assert tag is not None and tag.manifest_digest == dg(5) and tag.blobs == (dg(11), dg(40))
        assert index.stat_under("/ctx") == {e.path: e for e in rows}
        assert index.last_record_at("other", "1", 4) is not None
    r.close()
    r.close()  # idempotent


def test_recorder_refuses_reads_and_unknown_methods(tmp_path: Path) -> None:
    r = Recorder.start(tmp_path / "lbuild.db")
    try:
        with pytest.raises(ValueError, match="not an index write"):
            r.call("delete_steps", [key(1)])
        with pytest.raises(ValueError, match="not an index write"):
            r.call("get_step", key(1))
    finally:
        r.close()


def test_recorder_reports_a_failed_write_once_and_skips_the_rest(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    r = Recorder.start(blocker / "lbuild.db")
    r.call("put_step", rec(1))
    with pytest.raises(StoreError, match="cannot open the cache index"):
        r.sync()
    with pytest.raises(StoreError, match="cannot open the cache index"):
        r.close()


def test_recorder_child_killed_is_an_error_not_a_hang(tmp_path: Path) -> None:
    r = Recorder.start(tmp_path / "lbuild.db")
    r.sync()  # the child is up
    os.kill(r._proc.pid, signal.SIGKILL)
    r._proc.wait()
    r.call("put_step", rec(1))  # a broken pipe is remembered, not raised here
    with pytest.raises(StoreError, match="index writer"):
        r.close()


def test_parent_killed_mid_build_leaves_whole_records(tmp_path: Path) -> None:
    """A parent SIGKILLed after sending writes: the child applies every whole frame it got."""
    db = tmp_path / "lbuild.db"
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_recorder import rec
        from cache.index.recorder import Recorder
        r = Recorder.start({str(db)!r})
        for n in range(1, 51):
            r.call("put_step", rec(n, diff=100 + n))
        print(r._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert p.returncode == -signal.SIGKILL
    child = int(p.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the writer child kept running after its parent died")
    with Index.open(db) as index:
        got = index.get_steps([key(n) for n in range(1, 51)])
    assert got == {key(n): rec(n, diff=100 + n) for n in range(1, 51)}


def test_child_keeps_the_build_lock_until_its_last_write(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    r = Recorder.start(tmp_path / "lbuild.db", keep_fds=(fd,))
    os.close(fd)  # the parent lets go; the child still holds the same lock
    other = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r.close()
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the child is gone
    finally:
        os.close(other)


def test_build_index_reads_its_own_writes_and_the_database(tmp_path: Path) -> None:
    db = tmp_path / "lbuild.db"
    with Index.open(db) as index:
        index.put_step(rec(1, diff=11))
        index.put_compressed(dg(11), "gzip", 3, "v1", BlobInfo(dg(41), 5, MEDIA_TYPES["gzip"]))
        index.stat_put_many([StatEntry("/c/a", 1, 2, 3, 4, 0o100644, "a" * 64)])
    bi = BuildIndex.open(db)
    assert bi is not None
    try:
        assert bi.get_step(key(1)) == rec(1, diff=11)  # from the database
        assert bi.get_step(key(2)) is None
        assert bi.put_step(rec(2, diff=12)) is True
        assert bi.put_step(rec(2, diff=12)) is False
        assert bi.get_step(key(2)) == rec(2, diff=12)  # before the child has written it
        zs = BlobInfo(dg(42), 6, MEDIA_TYPES["zstd"])
        bi.put_compressed(dg(12), "zstd", 3, "v1", zs)
        assert bi.get_compressed(dg(12), "zstd", 3, "v1") == zs
        assert bi.get_compressed(dg(11), "gzip", 3, "v1") == BlobInfo(
            dg(41), 5, MEDIA_TYPES["gzip"]
        )
        bi.set_tag("localhost/x:1", dg(9), "{}", blobs=[dg(12)], now=5.0)
        got = bi.get_tag("localhost/x:1")
        assert got is not None and got.blobs == (dg(12),)
        assert bi.stat_under("/c") == {"/c/a": StatEntry("/c/a", 1, 2, 3, 4, 0o100644, "a" * 64)}
    finally:
        bi.close()
    with Index.open(db) as index:
        assert index.get_step(key(2)) == rec(2, diff=12)
        assert index.get_compressed(dg(12), "zstd", 3, "v1") == zs
        tag = index.get_tag("localhost/x:1")
        assert tag is not None and tag.manifest_digest == dg(9)


def test_build_index_on_a_new_home_and_where_it_does_not_apply(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "lbuild.db"
    bi = BuildIndex.open(fresh)
    assert bi is not None and bi.path is None  # nothing to read yet: every read is empty
    try:
        assert bi.get_step(key(1)) is None and bi.stat_under("/") == {}
        bi.put_step(rec(1))
    finally:
        bi.close()
    with Index.open(fresh) as index:  # the child created the database
        assert index.get_step(key(1)) == rec(1)
    assert BuildIndex.open("postgresql://u@localhost/lbuild") is None
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database")
    assert BuildIndex.open(garbage) is None  # Index.open must say what is wrong


def _index_state(home: Path) -> dict[str, object]:
    with Index.open(home / "lbuild.db") as index:
        steps = index.list_steps(limit=None, oldest_first=True)
        ctx_rows = index.stat_under(str(home.parent / "ctx"))
        return {
            "steps": sorted(
                (r.key, r.diff_id, r.inputs, r.dockerfile_id, r.position) for r in steps
            ),
            "tags": [(t.name, t.manifest_digest, t.blobs) for t in index.list_tags()],
            "stat": sorted((p, e.blake3) for p, e in ctx_rows.items()),
        }


def test_process_and_inline_writers_leave_the_same_index(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    for n in range(30):
        (ctx / "src" / f"f{n}.txt").write_text(f"file {n}\n" * (n + 1))
    (ctx / "Dockerfile").write_text(
        "FROM scratch AS a\nCOPY src/ /a/\n"
        "FROM scratch\nCOPY --link src/ /src/\nCOPY --from=a /a /b\nENV X=1\n"
    )
    time.sleep(2.1)  # older than the stat index's racy window (ctime cannot be set back)
    results = {}
    for writer in ("inline", "process", "fast"):
        home = tmp_path / writer
        opts = BuildOptions(
            context=ctx,
            home=home,
            tags=("localhost/app:1",),
            outputs=(Output("oci", tmp_path / f"out-{writer}"),),
        )
        first = build(opts, PlainReporter(open(os.devnull, "w")), writer=writer)  # noqa: SIM115
        again = build(opts, PlainReporter(open(os.devnull, "w")), writer=writer, memo=False)  # noqa: SIM115
        assert again.manifest_digest == first.manifest_digest
        assert (first.steps_cached, again.steps_cached) == (0, again.steps_total)
        results[writer] = (first.manifest_digest, _index_state(home))
    assert results["inline"][0] == results["process"][0] == results["fast"][0]
    state = results["process"][1]
    assert isinstance(state, dict) and len(state["stat"]) == 30
    assert results["inline"][1] == state == results["fast"][1]


def test_inline_writes_report_the_first_failure_and_skip_the_rest(tmp_path: Path) -> None:
    from cache.index.recorder import InlineWrites

    db = tmp_path / "home" / "lbuild.db"
    w = InlineWrites.open(db)
    assert w is not None
    w.call("put_step", rec(1))
    w.sync()
    with pytest.raises(ValueError):
        w.call("get_step", key(1))  # reads are not writes
    w.call("stat_put_many", ["not a stat entry"])  # fails in the writer
    w.call("put_step", rec(2))  # skipped: a write after a failed one
    with pytest.raises(StoreError):
        w.sync()
    with pytest.raises(StoreError):
        w.close()
    w.abandon()  # closed already: nothing to do
    with pytest.raises(StoreError, match="closed"):
        w.call("put_step", rec(3))
    with Index.open(db) as index:
        assert index.get_step(key(1)) == rec(1)
        assert index.get_step(key(2)) is None
    old = tmp_path / "old.db"
    Index.open(old).close()
    with sqlite3.connect(old) as raw:
        raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    assert InlineWrites.open(old) is None  # Index's to migrate


def test_a_build_with_the_process_or_fast_writer_never_imports_sqlalchemy(
    tmp_path: Path,
) -> None:
    for writer in ("process", "fast"):
        _never_imports_sqlalchemy(tmp_path / writer, writer)


def _never_imports_sqlalchemy(tmp_path: Path, writer: str) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir(parents=True)
    (ctx / "a.txt").write_text("a\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
    code = textwrap.dedent(
        f"""
        import io, sys
        from pathlib import Path
        from builder.options import BuildOptions
        from builder.api import build
        from builder.progress import PlainReporter
        opts = BuildOptions(context=Path({str(ctx)!r}), home=Path({str(tmp_path / "home")!r}))
        for _ in range(2):
            r = build(opts, PlainReporter(io.StringIO()), writer={writer!r}, memo=False)
        print(r.steps_cached, r.steps_total, "sqlalchemy" in sys.modules)
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert p.stdout.split() == ["1", "1", "False"]


def test_a_writer_started_ahead_holds_its_own_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    r = Recorder.start(tmp_path / "lbuild.db", lock=lock)
    r.sync()  # answered after the child took the lock and opened the index
    fd = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r.call("put_step", rec(1))
        r.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    with Index.open(tmp_path / "lbuild.db") as index:
        assert index.get_step(key(1)) == rec(1)


def test_abandon_stops_the_child_and_frees_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    r = Recorder.start(tmp_path / "lbuild.db", lock=lock)
    r.sync()
    r.abandon()
    assert r._proc.poll() is not None
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel dropped the child's lock
    finally:
        os.close(fd)
    r.abandon()  # idempotent
    r.close()  # and closing an abandoned writer is a no-op


def test_a_no_op_build_leaves_no_writer_running(tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
    home = tmp_path / "home"
    env = dict(os.environ, LBUILD_HOME=str(home))
    cmd = [sys.executable, "-m", "builder", "build", str(ctx), "--progress", "plain"]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    time.sleep(2.1)  # past the racy window, so the next build can write a no-op memo
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120)
    p = subprocess.run(
        cmd, env=env, cwd=ROOT, check=True, capture_output=True, timeout=120, text=True
    )
    assert "1/1 steps cached" in p.stderr  # answered by the no-op path
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert not [line for line in ps.stdout.splitlines() if str(home / "lbuild.db") in line]


def test_writes_the_child_could_not_apply_are_applied_by_the_build(tmp_path: Path) -> None:
    db = tmp_path / "lbuild.db"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    # a child that cannot open its index, and one that dies before serving at all
    broken = Recorder.start(blocker / "lbuild.db")
    dead = Recorder(
        subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.exit(3)"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    )
    for n, recorder in enumerate((broken, dead), start=1):
        bi = BuildIndex(None, recorder, db)
        bi.put_step(rec(n, diff=10 + n))
        bi.stat_put_many([StatEntry(f"/c/{n}", n, n, n, n, 0o100644, "b" * 64)])
        bi.close()  # no error: applied here instead
    with Index.open(db) as index:
        assert index.get_step(key(1)) == rec(1, diff=11)
        assert index.get_step(key(2)) == rec(2, diff=12)
        assert set(index.stat_under("/c")) == {"/c/1", "/c/2"}


def test_a_failed_write_after_others_were_applied_is_an_error(tmp_path: Path) -> None:
    db = tmp_path / "lbuild.db"
    r = Recorder.start(db)
    r.call("put_step", rec(1))
    r.call("put_step", "not a record")
    r.call("put_step", rec(2))
    with pytest.raises(StoreError) as info:
        r.close()
    assert not isinstance(info.value, NothingApplied)
    with Index.open(db) as index:
        assert index.get_step(key(1)) == rec(1)
        assert index.get_step(key(2)) is None  # skipped after the failure


def _cli_build(ctx: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LBUILD_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "builder", "build", str(ctx), "--progress", "plain"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _small_ctx(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "a.txt").write_text("a\n")
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY a.txt /a.txt\n")
    return ctx


def test_a_build_on_an_old_schema_migrates_it_in_process(tmp_path: Path) -> None:
    """The stdlib read path declines an old schema; the build then opens Index, which migrates."""
    import sqlite3

    from test_records import V1_SCHEMA

    from cache.index.db import SCHEMA_VERSION

    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "lbuild.db") as raw:
        raw.executescript(V1_SCHEMA.format(k="ab" * 32, d="cd" * 32))
    p = _cli_build(_small_ctx(tmp_path), home)
    assert p.returncode == 0, p.stderr
    with sqlite3.connect(home / "lbuild.db") as raw:
        (version,) = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        keys = {r[0] for r in raw.execute("SELECT key FROM steps")}
    assert version == str(SCHEMA_VERSION)
    assert "ab" * 32 in keys and len(keys) >= 2  # the old record kept, the new ones added


def test_a_build_on_a_newer_or_broken_index_fails_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    from cache.index.db import SCHEMA_VERSION

    ctx = _small_ctx(tmp_path)
    newer = tmp_path / "newer"
    Index.open(newer / "lbuild.db").close()
    with sqlite3.connect(newer / "lbuild.db") as raw:
        raw.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "lbuild.db").write_bytes(b"not a database" * 100)
    for home, words in ((newer, "is newer than this lbuild"), (broken, "not a database")):
        p = _cli_build(ctx, home)
        assert p.returncode == 1
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lbuild: error: ") and words in lines[0]


FORKED = """
import fcntl, os, sys
sys.path.insert(0, {root!r})
from cache.index.recorder import Recorder
from test_recorder import rec, key
db, lock = sys.argv[1], sys.argv[2]
r = Recorder.fork(db, lock=lock)
r.call("put_step", rec(1, diff=11))
r.call("put_step", rec(2))
r.sync()
fd = os.open(lock, os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("lock free while the writer runs")
except BlockingIOError:
    print("lock held")
r.close()
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("lock free after close", r._proc.poll())
a = Recorder.fork(db + "-2")
a.sync()
a.abandon()
print("abandoned", a._proc.poll() is not None)
"""


def test_a_forked_writer_is_the_spawned_one(tmp_path: Path) -> None:
    """``Recorder.fork`` (a command in ``lbuild daemon``) writes, holds the lock until its
    last write and stops as the spawned writer does; run in a process of its own (one
    thread: forking pytest's would risk a lock held by another thread)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    script = FORKED.format(root=str(root))
    p = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "lbuild.db"), str(tmp_path / "lock")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["lock held", "lock free after close 0", "abandoned True"]
    with Index.open(tmp_path / "lbuild.db") as index:
        assert index.get_step(key(1)) == rec(1, diff=11)
        assert index.get_step(key(2)) == rec(2)
