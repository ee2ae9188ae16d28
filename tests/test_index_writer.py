"""The index writer child's stdlib writes (cache.index.writer): the same rows as SQLAlchemy's
``Index`` for the same calls (random sequences, every table compared with each value's
SQLite type), declined where they do not apply, retried while another writer holds the lock,
and used by the real writer child without importing SQLAlchemy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache.index.records import BuildRecord, Index, Site, StatEntry, StepRecord
from cache.index.writer import FastWriter
from cache.types import MEDIA_TYPES, BlobInfo, Digest, StepKey

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("steps", "step_sites", "compressed", "tags", "tag_blobs", "builds", "stat_index", "meta")


def key(n: int) -> StepKey:
    return StepKey(f"{n:064x}")


def dg(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, each value with its SQLite storage type."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with sqlite3.connect(db) as c:
        for t in TABLES:
            cols = [r[1] for r in c.execute(f"PRAGMA table_info({t})")]
            sel = ", ".join(f"{col}, typeof({col})" for col in cols)
            out[t] = sorted(c.execute(f"SELECT {sel} FROM {t}").fetchall(), key=repr)
    return out


small = st.integers(min_value=0, max_value=5)
times = st.one_of(st.floats(min_value=0, max_value=2e9, allow_nan=False), st.integers(0, 2**31))


def step_record(n: int, diff: int | None, t: float, pos: int) -> StepRecord:
    return StepRecord(
        key=key(n),
        diff_id=dg(diff) if diff is not None else None,
        layer_size=n * 10,
        toc_digest=dg(diff + 100) if diff is not None else None,
        config_delta='{"env": []}',
        inputs=f'{{"n": {n}}}',
        dockerfile_id=f"df{pos % 2}",
        stage=str(pos % 3),
        position=pos,
        created=t,
        last_used=t,
        hits=0,
        build_seconds=0.25,
    )


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _put(n: int, d: int | None, t: float, p: int) -> Call:
    return ("put_step", (step_record(n, d, t, p),), {})


def _touch(ks: list[int], t: float, with_sites: bool) -> Call:
    sites = {"sites": [Site("dfx", "1", k) for k in ks]} if with_sites else {}
    return ("touch_steps", ([key(k) for k in ks], t), sites)


def _compressed(d: int, level: int, b: int) -> Call:
    return ("put_compressed", (dg(d), "gzip", level, "v1", BlobInfo(dg(b), b, MEDIA_TYPES["gzip"])), {})


def _tag(n: int, m: int, bs: list[int], t: float) -> Call:
    return ("set_tag", (f"app:{n}", dg(m), "{}"), {"blobs": [dg(b) for b in bs], "now": t})


def _build(t: float, h: int) -> Call:
    return ("add_build", (BuildRecord(t, "app", None, 0.5, h, 1),), {})


def _stat(ps: list[int], v: int) -> Call:
    # the same path again with other values: an update of every column
    entries = [StatEntry(f"/c/f{p}", p + v, v * 7, v + 3, p + v + 1, 0o100644 | v, f"{p + v:064x}")
               for p in ps]  # fmt: skip
    return ("stat_put_many", (entries,), {})


ops = st.lists(
    st.one_of(
        st.builds(_put, small, st.one_of(st.none(), small), times, small),
        st.builds(_touch, st.lists(small, max_size=4), times, st.booleans()),
        st.builds(_compressed, small, st.integers(1, 2), small),
        st.builds(_tag, small, small, st.lists(small, max_size=4), times),
        st.builds(_build, times, small),
        st.builds(_stat, st.lists(small, max_size=6), small),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=ops)
def test_the_same_calls_leave_the_same_rows(
    tmp_path_factory: pytest.TempPathFactory, calls: list[Call]
) -> None:
    tmp = tmp_path_factory.mktemp("w")
    a, b = tmp / "orm.db", tmp / "fast.db"
    Index.open(b).close()
    fast = FastWriter.open(b)
    assert fast is not None
    with Index.open(a) as index:
        for method, args, kwargs in calls:
            want = getattr(index, method)(*args, **kwargs)
            got = getattr(fast, method)(*args, **kwargs)
            assert got == want, method
    fast.close()
    assert rows(a) == rows(b)


def test_it_declines_what_it_cannot_write(tmp_path: Path) -> None:
    assert FastWriter.open(tmp_path / "missing.db") is None
    assert FastWriter.open("postgresql://u@127.0.0.1/x") is None
    (tmp_path / "garbage.db").write_bytes(b"not a database" * 100)
    assert FastWriter.open(tmp_path / "garbage.db") is None
    old = tmp_path / "old.db"
    Index.open(old).close()
    with sqlite3.connect(old) as c:
        c.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    assert FastWriter.open(old) is None
    current = tmp_path / "current.db"
    Index.open(current).close()
    w = FastWriter.open(f"sqlite:///{current}")
    assert w is not None
    w.close()


def test_a_write_waits_for_another_writers_lock(tmp_path: Path) -> None:
    db = tmp_path / "lbuild.db"
    Index.open(db).close()
    w = FastWriter.open(db)
    assert w is not None
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO tags VALUES ('held', ?, '{}', 1.0)", (dg(1),))
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    t0 = time.monotonic()
    assert w.put_step(step_record(1, 2, 5.0, 0)) is True
    assert time.monotonic() - t0 >= 0.25
    assert w.put_step(step_record(1, 3, 6.0, 0)) is False  # the first record stays
    w.close()
    other.close()
    with Index.open(db) as index:
        got = index.get_step(key(1))
        assert got is not None and got.diff_id == dg(2)
        assert index.get_tag("held") is not None


def _serve(db: Path, frames: list[tuple[Any, ...]]) -> tuple[list[object], bool]:
    """Run the writer child's loop in a fresh interpreter: its replies, and whether it had
    imported SQLAlchemy by the end."""
    code = textwrap.dedent(
        f"""
        import io, pickle, sys
        from cache.index import recorder
        out = io.BytesIO()
        recorder.serve({str(db)!r}, sys.stdin.buffer, out)
        sys.stdout.buffer.write(pickle.dumps((out.getvalue(), "sqlalchemy" in sys.modules)))
        """
    )
    import io
    import pickle

    from cache.index.recorder import _read_frame, _write_frame

    inp = io.BytesIO()
    for f in frames:
        _write_frame(inp, f)
    p = subprocess.run([sys.executable, "-c", code], input=inp.getvalue(),
                       capture_output=True, cwd=ROOT, timeout=60, check=True)  # fmt: skip
    raw, imported = pickle.loads(p.stdout)
    replies, stream = [], io.BytesIO(raw)
    while (r := _read_frame(stream)) is not None:
        replies.append(r)
    return replies, imported


def test_the_writer_child_needs_no_sqlalchemy_on_a_current_index(tmp_path: Path) -> None:
    frames = [("call", "put_step", (step_record(1, 2, 5.0, 0),), {}), ("sync",)]
    current = tmp_path / "current.db"
    Index.open(current).close()
    replies, imported = _serve(current, frames)
    assert replies == ["serving", False] and imported is False
    fresh = tmp_path / "fresh" / "lbuild.db"  # no index yet: made without SQLAlchemy too
    replies, imported = _serve(fresh, frames)
    assert replies == ["serving", False] and imported is False
    from test_records import V1_SCHEMA

    old = tmp_path / "old.db"  # an older schema: SQLAlchemy's Index migrates it
    with sqlite3.connect(old) as c:
        c.executescript(V1_SCHEMA.format(k="ab" * 32, d="cd" * 32))
    replies, imported = _serve(old, frames)
    assert replies == ["serving", False] and imported is True
    for db in (current, fresh, old):
        with Index.open(db) as index:
            got = index.get_step(key(1))
            assert got is not None and got.diff_id == dg(2)


def _schema(db: Path) -> list[tuple[str, str, str, str]]:
    with sqlite3.connect(db) as c:
        return [(t, n, tbl, " ".join((sql or "").split()))
                for t, n, tbl, sql in c.execute(
                    "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")]  # fmt: skip


def test_a_new_index_has_the_schema_index_open_makes(tmp_path: Path) -> None:
    from cache.index.reader import FastIndex

    Index.open(tmp_path / "orm.db").close()
    w = FastWriter.open(tmp_path / "new" / "fast.db", create=True)
    assert w is not None
    w.close()
    assert _schema(tmp_path / "new" / "fast.db") == _schema(tmp_path / "orm.db")
    with sqlite3.connect(tmp_path / "new" / "fast.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert c.execute("SELECT * FROM meta").fetchall() == [("schema_version", "2")]
    with Index.open(tmp_path / "new" / "fast.db") as index:  # no migration, usable
        index.add_build(BuildRecord(1.0, "t", None, 0.1, 0, 0))
    fast = FastIndex.open(tmp_path / "new" / "fast.db")
    assert fast is not None
    fast.close()


def test_a_new_index_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody sees a new index before its schema is whole: a build's read path that opened
    one half made declined it, and the build paid for SQLAlchemy (found under py-spy)."""
    from cache.index import writer
    from cache.index.reader import FastIndex

    db = tmp_path / "home" / "lbuild.db"
    seen: list[tuple[bool, bool]] = []
    real = writer._create

    def watched(c: sqlite3.Connection) -> None:
        real(c)
        seen.append((db.exists(), FastIndex.open(db) is not None))

    monkeypatch.setattr(writer, "_create", watched)
    w = FastWriter.open(db, create=True)
    assert w is not None
    w.close()
    assert seen == [(False, False)]  # made once, out of sight
    fast = FastIndex.open(db)
    assert fast is not None
    fast.close()
    assert not [p for p in db.parent.iterdir() if ".new-" in p.name]  # no scratch left
    empty = tmp_path / "empty" / "lbuild.db"  # an empty file already there: made in place
    empty.parent.mkdir()
    empty.touch()
    w = FastWriter.open(empty, create=True)
    assert w is not None
    w.close()
    assert [exists for exists, _ in seen[1:]] == [True]
    fast = FastIndex.open(empty)
    assert fast is not None
    fast.close()


def test_two_processes_making_a_new_index_at_once_make_one(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        which, db, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
        if which == "fast":
            from cache.index.writer import FastWriter as W
            w = W.open(db, create=True)
        else:
            from cache.index.records import Index
        while time.time() < at:
            pass
        if which == "fast":
            w = W.open(db, create=True)
            assert w is not None
            w.add_build(__import__("cache.index.records").index.records.BuildRecord(
                1.0, "fast", None, 0.1, 0, 0))
        else:
            with Index.open(db) as i:
                i.add_build(__import__("cache.index.records").index.records.BuildRecord(
                    1.0, "orm", None, 0.1, 0, 0))
        """
    )
    for n in range(4):
        db = tmp_path / f"race{n}" / "lbuild.db"
        at = str(time.time() + 1.5)
        procs = [subprocess.Popen([sys.executable, "-c", code, which, str(db), at], cwd=ROOT)
                 for which in ("fast", "orm", "fast")]  # fmt: skip
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
        with sqlite3.connect(db) as c:
            assert sorted(r[0] for r in c.execute("SELECT target FROM builds")) == [
                "fast", "fast", "orm"]
            assert c.execute("SELECT COUNT(*) FROM meta").fetchone() == (1,)
        Index.open(tmp_path / "orm.db").close()
        assert _schema(db) == _schema(tmp_path / "orm.db")


def test_closing_leaves_the_index_in_its_database_file(tmp_path: Path) -> None:
    """The build's read-only connection is still open when the writer child closes (a
    read-only connection never checkpoints): the writes must not stay in the WAL, where
    the next connection to close would move them (and ``cache du`` saw two layouts)."""
    import shutil

    from cache.index.reader import FastIndex

    db = tmp_path / "lbuild.db"
    w = FastWriter.open(db, create=True)
    assert w is not None
    reader = FastIndex.open(db)
    assert reader is not None
    w.stat_put_many([StatEntry(f"/c/f{n}", n, n, n, n, 0o100644, f"{n:064x}") for n in range(2000)])
    w.close()
    wal = tmp_path / "lbuild.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    reader.close()
    shutil.copy(db, tmp_path / "alone.db")  # the database file without its WAL
    with sqlite3.connect(tmp_path / "alone.db") as c:
        assert c.execute("SELECT COUNT(*) FROM stat_index").fetchone() == (2000,)
