"""Tests of the cache index (cache.index.records, cache.index.db, cache.index.reader) on real SQLite files."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cache.errors import StoreError
from cache.index.db import (
    SCHEMA_VERSION,
    Migration,
    ensure_schema,
    make_engine,
    sqlite_file,
    to_url,
)
from cache.index.reader import FastIndex
from cache.index.records import (
    BuildRecord,
    Index,
    PrunedStep,
    Site,
    StatEntry,
    StepRecord,
    prefix_range,
)
from cache.types import MEDIA_TYPES, BlobInfo, Digest, StepKey

DEFAULT_SITE = Site("Dockerfile@ctx", "0", 1)


def key(n: int) -> StepKey:
    return StepKey(f"{n:064x}")


def dg(n: int) -> Digest:
    return Digest(f"sha256:{n:064x}")


def rec(
    n: int,
    *,
    diff: int | None = None,
    toc: int | None = None,
    last_used: float = 100.0,
    site: Site = DEFAULT_SITE,
    inputs: str = '{"run": "echo"}',
) -> StepRecord:
    return StepRecord(
        key=key(n),
        diff_id=dg(diff) if diff is not None else None,
        layer_size=0 if diff is None else 1000 + n,
        toc_digest=dg(toc) if toc is not None else None,
        config_delta='{"Env": ["A=1"]}',
        inputs=inputs,
        dockerfile_id=site.dockerfile_id,
        stage=site.stage,
        position=site.position,
        created=last_used,
        last_used=last_used,
        hits=0,
        build_seconds=0.5,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "lbuild.db"


@pytest.fixture
def index(db: Path) -> Iterator[Index]:
    idx = Index.open(db)
    yield idx
    idx.close()


# -- URLs and paths ------------------------------------------------------------------------


def test_sqlite_file_and_url_forms(tmp_path: Path) -> None:
    p = tmp_path / "x.db"
    assert sqlite_file(p) == p
    assert sqlite_file(to_url(p)) == p
    assert sqlite_file("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_file("sqlite://") is None
    assert sqlite_file("sqlite:///:memory:") is None
    assert sqlite_file("postgresql://u@h/db") is None
    assert to_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_prefix_range_selects_only_paths_below() -> None:
    low, high = prefix_range("/a/b/")
    inside = ["/a/b/c", "/a/b/c/d", "/a/b/.x", "/a/b/\uffff"]
    outside = ["/a/b", "/a/b0", "/a/b.c", "/a/bc", "/a/a/z", "/b"]
    assert all(low <= p < high for p in inside)
    assert not any(low <= p < high for p in outside)
    low, high = prefix_range("/")
    assert all(low <= p < high for p in ["/x", "/a/b"])


# -- step records --------------------------------------------------------------------------


def test_step_round_trip_and_config_only(index: Index) -> None:
    layer = rec(1, diff=11, toc=12)
    config_only = rec(2)
    assert index.put_step(layer) is True
    assert index.put_step(config_only) is True
    assert index.get_step(key(1)) == layer
    assert index.get_step(key(2)) == config_only
    assert config_only.blobs == frozenset()
    assert layer.blobs == {dg(11), dg(12)}
    assert index.get_step(key(3)) is None
    assert index.get_steps([key(1), key(3), key(2), key(1)]) == {key(1): layer, key(2): config_only}


def test_put_step_is_idempotent_first_record_wins(index: Index) -> None:
    first = rec(1, diff=11)
    second = rec(1, diff=99, inputs='{"other": 1}')
    assert index.put_step(first) is True
    assert index.put_step(second) is False
    assert index.put_step(first) is False
    assert index.get_step(key(1)) == first
    assert len(index.list_steps()) == 1


def test_touch_steps_counts_hits_in_batches(index: Index) -> None:
    for n in range(3):
        index.put_step(rec(n, last_used=10.0))
    index.touch_steps([key(0), key(1), key(0), key(777)], 50.0)
    got = index.get_steps([key(0), key(1), key(2)])
    assert got[key(0)].hits == 1  # a key listed twice is one hit
    assert got[key(0)].last_used == 50.0
    assert got[key(1)].hits == 1
    assert got[key(2)].hits == 0 and got[key(2)].last_used == 10.0
    assert index.get_step(key(777)) is None
    keys = [key(n) for n in range(3)] + [key(n) for n in range(100, 1300)]  # several IN chunks
    index.touch_steps(keys, 60.0)
    assert all(r.last_used == 60.0 for r in index.list_steps())
    with pytest.raises(ValueError):
        index.touch_steps([key(0)], 1.0, sites=[])


def test_last_record_at_follows_sites(index: Index) -> None:
    here = Site("A/Dockerfile@c1", "build", 3)
    elsewhere = Site("B/Dockerfile@c2", "0", 3)
    index.put_step(rec(1, last_used=10.0, site=here))
    index.put_step(rec(2, last_used=20.0, site=here))  # the step at `here` was edited
    assert index.last_record_at(*_site(here)).key == key(2)  # type: ignore[union-attr]
    # key 1 is used again at `here` (the edit was undone): it is now the last record there
    index.touch_steps([key(1)], 30.0, sites=[here])
    assert index.last_record_at(*_site(here)).key == key(1)  # type: ignore[union-attr]
    # key 1 hit from another Dockerfile: why there finds it although it was built at `here`
    assert index.last_record_at(*_site(elsewhere)) is None
    index.touch_steps([key(1), key(9)], 40.0, sites=[elsewhere, elsewhere])
    found = index.last_record_at(*_site(elsewhere))
    assert found is not None and found.key == key(1) and found.site == here
    assert index.last_record_at("A/Dockerfile@c1", "build", 4) is None
    assert index.delete_steps([key(1)]) == 1
    assert index.last_record_at(*_site(elsewhere)) is None
    assert index.last_record_at(*_site(here)).key == key(2)  # type: ignore[union-attr]


def _site(s: Site) -> tuple[str, str, int]:
    return s.dockerfile_id, s.stage, s.position


def test_list_and_delete_steps(index: Index) -> None:
    for n, used in [(1, 30.0), (2, 10.0), (3, 20.0)]:
        index.put_step(rec(n, last_used=used))
    assert [r.key for r in index.list_steps()] == [key(2), key(3), key(1)]
    assert [r.key for r in index.list_steps(oldest_first=False, limit=2)] == [key(1), key(3)]
    assert index.delete_steps([key(2), key(3), key(42)]) == 2
    assert [r.key for r in index.list_steps()] == [key(1)]


def test_compressed_round_trip(index: Index) -> None:
    blob = BlobInfo(dg(5), 123, MEDIA_TYPES["zstd"])
    index.put_compressed(dg(4), "zstd", 3, "zstandard-0.22", blob)
    index.put_compressed(dg(4), "zstd", 3, "zstandard-0.22", BlobInfo(dg(6), 1, "x"))  # no-op
    assert index.get_compressed(dg(4), "zstd", 3, "zstandard-0.22") == blob
    assert index.get_compressed(dg(4), "zstd", 19, "zstandard-0.22") is None
    assert index.get_compressed(dg(4), "zstd", 3, "zstandard-0.23") is None
    assert index.get_compressed(dg(4), "gzip", 3, "zstandard-0.22") is None


def test_tags(index: Index) -> None:
    index.set_tag("app:latest", dg(1), '{"platform": "linux/amd64"}', blobs=[dg(3), dg(2)], now=5.0)
    index.set_tag("base", dg(9), "{}", now=6.0)
    got = index.get_tag("app:latest")
    assert got is not None
    assert (got.manifest_digest, got.meta_json, got.updated, got.blobs) == (
        dg(1),
        '{"platform": "linux/amd64"}',
        5.0,
        (dg(2), dg(3)),
    )
    index.set_tag("app:latest", dg(7), "{}", blobs=[dg(8)], now=7.0)  # retag replaces blobs
    got = index.get_tag("app:latest")
    assert got is not None and got.manifest_digest == dg(7) and got.blobs == (dg(8),)
    assert [t.name for t in index.list_tags()] == ["app:latest", "base"]
    assert index.delete_tag("base") is True
    assert index.delete_tag("base") is False
    assert index.get_tag("base") is None


def test_builds(index: Index) -> None:
    a = index.add_build(BuildRecord(10.0, "app", dg(1), 2.5, 7, 1))
    b = index.add_build(BuildRecord(20.0, "app", None, 0.2, 8, 0))
    assert b > a
    assert index.list_builds() == [
        BuildRecord(20.0, "app", None, 0.2, 8, 0, id=b),
        BuildRecord(10.0, "app", dg(1), 2.5, 7, 1, id=a),
    ]
    assert len(index.list_builds(limit=1)) == 1


# -- database settings, schema versions, migration -----------------------------------------


def test_wal_and_foreign_keys_are_on(index: Index, db: Path) -> None:
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    engine = make_engine(db)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        engine.dispose()


def test_fresh_database_has_current_version(index: Index, db: Path) -> None:
    with sqlite3.connect(db) as raw:
        row = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row == (str(SCHEMA_VERSION),)


def test_newer_schema_is_refused(db: Path) -> None:
    Index.open(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 5),)
        )
    with pytest.raises(StoreError) as err:
        Index.open(db)
    assert str(err.value) == (
        f"cache schema version {SCHEMA_VERSION + 5} is newer than this lbuild ({SCHEMA_VERSION}); "
        "upgrade lbuild or use another LBUILD_HOME"
    )
    assert FastIndex.open(db) is None


def test_garbage_file_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "lbuild.db"
    bad.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="not a database"):
        Index.open(bad)
    assert FastIndex.open(bad) is None


V1_SCHEMA = """
CREATE TABLE meta (key VARCHAR(64) NOT NULL PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE steps (
  key VARCHAR(64) NOT NULL PRIMARY KEY, diff_id VARCHAR(71), layer_size BIGINT NOT NULL,
  config_delta TEXT NOT NULL, inputs TEXT NOT NULL, dockerfile_id TEXT NOT NULL,
  stage TEXT NOT NULL, position INTEGER NOT NULL, created FLOAT NOT NULL,
  last_used FLOAT NOT NULL, hits INTEGER NOT NULL, build_seconds FLOAT NOT NULL);
CREATE INDEX ix_steps_last_used ON steps (last_used);
CREATE INDEX ix_steps_diff_id ON steps (diff_id);
CREATE TABLE compressed (
  diff_id VARCHAR(71) NOT NULL, codec VARCHAR(16) NOT NULL, level INTEGER NOT NULL,
  codec_version VARCHAR(64) NOT NULL, digest VARCHAR(71) NOT NULL, size BIGINT NOT NULL,
  media_type TEXT NOT NULL, PRIMARY KEY (diff_id, codec, level, codec_version));
CREATE INDEX ix_compressed_digest ON compressed (digest);
CREATE TABLE tags (name TEXT NOT NULL PRIMARY KEY, manifest_digest VARCHAR(71) NOT NULL,
  meta_json TEXT NOT NULL, updated FLOAT NOT NULL);
CREATE TABLE tag_blobs (tag TEXT NOT NULL REFERENCES tags (name) ON DELETE CASCADE,
  digest VARCHAR(71) NOT NULL, PRIMARY KEY (tag, digest));
CREATE TABLE builds (id INTEGER NOT NULL PRIMARY KEY, started FLOAT NOT NULL, target TEXT NOT NULL,
  manifest_digest VARCHAR(71), seconds FLOAT NOT NULL, steps_hit INTEGER NOT NULL,
  steps_missed INTEGER NOT NULL);
CREATE INDEX ix_builds_started ON builds (started);
CREATE TABLE stat_index (path TEXT NOT NULL PRIMARY KEY, size BIGINT NOT NULL,
  mtime_ns BIGINT NOT NULL, inode BIGINT NOT NULL, mode INTEGER NOT NULL,
  blake3 VARCHAR(64) NOT NULL);
INSERT INTO steps VALUES ('{k}', 'sha256:{d}', 5, '{{}}', '{{"a": 1}}', 'df', '0', 2, 1.0, 8.0, 3, 0.25);
INSERT INTO stat_index VALUES ('/ctx/a', 3, 111, 7, 33188, '{k}');
"""


def _columns(db: Path) -> dict[str, set[tuple[str, bool]]]:
    with sqlite3.connect(db) as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t: {(r[1], bool(r[3] or r[5])) for r in raw.execute(f"PRAGMA table_info({t})")}
            for t in tables
        }


def _indexes(db: Path) -> set[str]:
    with sqlite3.connect(db) as raw:
        return {
            r[0]
            for r in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }


def test_migration_from_v1_keeps_data_and_matches_fresh_schema(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as raw:
        raw.executescript(V1_SCHEMA.format(k="a" * 64, d="b" * 64))
    assert FastIndex.open(old) is None  # an old layout is never read by the fast path

    with Index.open(old) as idx:
        got = idx.get_step(StepKey("a" * 64))
        assert got is not None
        assert (got.diff_id, got.toc_digest, got.hits, got.inputs) == (
            Digest("sha256:" + "b" * 64),
            None,
            3,
            '{"a": 1}',
        )
        # the site trail was seeded from the record itself
        assert idx.last_record_at("df", "0", 2) == got
        # old stat rows cannot vouch for a file (no ctime): they are kept but never match
        row = idx.stat_get_many(["/ctx/a"])["/ctx/a"]
        assert row.ctime_ns == -1

    fresh = tmp_path / "fresh.db"
    Index.open(fresh).close()
    assert _columns(old) == _columns(fresh)
    assert _indexes(old) == _indexes(fresh)
    with sqlite3.connect(old) as raw:
        assert raw.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
    fast = FastIndex.open(old)
    assert fast is not None
    fast.close()


def test_migrations_run_in_one_transaction(tmp_path: Path) -> None:
    """A migration chain that fails halfway leaves the database as it was."""
    db = tmp_path / "x.db"
    Index.open(db).close()

    def add_column(conn: object) -> None:
        conn.exec_driver_sql("ALTER TABLE builds ADD COLUMN note TEXT")  # type: ignore[attr-defined]

    def explode(conn: object) -> None:
        conn.exec_driver_sql("CREATE TABLE half_done (x INTEGER)")  # type: ignore[attr-defined]
        raise RuntimeError("migration bug")

    engine = make_engine(db)
    try:
        chain = (
            Migration(SCHEMA_VERSION, "add note", add_column),
            Migration(SCHEMA_VERSION + 1, "broken", explode),
        )
        with pytest.raises(RuntimeError):
            ensure_schema(engine, current=SCHEMA_VERSION + 2, migrations=chain)
        assert "half_done" not in _columns(db)
        assert ("note", False) not in _columns(db)["builds"]
        # the same chain without the broken step applies and bumps the version
        assert (
            ensure_schema(engine, current=SCHEMA_VERSION + 1, migrations=chain[:1])
            == SCHEMA_VERSION
        )
        assert ("note", False) in _columns(db)["builds"]
        with pytest.raises(StoreError, match="no migration from cache schema version"):
            ensure_schema(engine, current=SCHEMA_VERSION + 3, migrations=())
    finally:
        engine.dispose()


# -- several processes at once -------------------------------------------------------------


def _worker(db: str, me: int, barrier: Any) -> None:
    barrier.wait()  # every process opens the brand-new database at the same moment
    idx = Index.open(db)
    try:
        for n in range(40):
            idx.put_step(rec(n, diff=n, last_used=float(n)))  # the same records in every process
            idx.put_step(rec(1000 * (me + 1) + n))  # and some of its own
        idx.touch_steps([key(n) for n in range(40)], 500.0)
        idx.set_tag(f"t{me}", dg(me), "{}", blobs=[dg(me + 100)])
        idx.add_build(BuildRecord(float(me), "x", None, 1.0, 40, 40))
    finally:
        idx.close()


def test_concurrent_writers_all_succeed(tmp_path: Path) -> None:
    db = tmp_path / "shared" / "lbuild.db"
    procs = 4
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    workers = [ctx.Process(target=_worker, args=(str(db), i, barrier)) for i in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * procs
    with Index.open(db) as idx:
        steps = idx.list_steps()
        assert len(steps) == 40 + 40 * procs
        shared = idx.get_steps([key(n) for n in range(40)])
        assert all(r.hits == procs and r.last_used == 500.0 for r in shared.values())
        assert [t.name for t in idx.list_tags()] == [f"t{i}" for i in range(procs)]
        assert len(idx.list_builds()) == procs


# -- garbage collection --------------------------------------------------------------------


def test_prune_by_age_removes_old_records_and_their_blobs(index: Index) -> None:
    index.put_step(rec(1, diff=11, toc=12, last_used=10.0))
    index.put_step(rec(2, diff=21, toc=22, last_used=90.0))
    sizes = {dg(11): 100, dg(12): 5, dg(21): 200, dg(22): 6, dg(99): 7}  # 99: nobody's
    plan = index.prune_plan(keep_bytes=None, keep_duration_s=50.0, now=100.0, blob_sizes=sizes)
    assert plan.steps == (PrunedStep(key(1), 10.0, "age"),)
    assert plan.blobs == tuple(sorted([dg(11), dg(12), dg(99)]))
    assert plan.freed_bytes == 112 and plan.kept_bytes == 206
    # planning changes nothing
    assert index.get_step(key(1)) is not None


def test_prune_by_size_is_lru_and_shared_blobs_stay(index: Index) -> None:
    index.put_step(rec(1, diff=11, last_used=10.0))  # oldest
    index.put_step(rec(2, diff=50, last_used=20.0))  # shares layer 50 with 3
    index.put_step(rec(3, diff=50, last_used=30.0))
    index.put_step(rec(4, diff=41, last_used=40.0))  # newest
    index.touch_steps([key(1)], 35.0)  # 1 used again: now 2 is the least recent
    sizes = {dg(11): 100, dg(50): 100, dg(41): 100}
    plan = index.prune_plan(keep_bytes=250, keep_duration_s=None, now=50.0, blob_sizes=sizes)
    # dropping 2 frees nothing (3 still needs 50), so 3 goes too; then 200 bytes remain
    assert plan.step_keys == (key(2), key(3))
    assert all(s.reason == "size" for s in plan.steps)
    assert plan.blobs == (dg(50),)
    assert plan.kept_bytes == 200 and plan.freed_bytes == 100
    everything = index.prune_plan(keep_bytes=0, keep_duration_s=None, now=50.0, blob_sizes=sizes)
    assert everything.step_keys == (key(2), key(3), key(1), key(4))
    assert everything.kept_bytes == 0


def test_prune_never_removes_what_tags_or_kept_records_need(index: Index) -> None:
    index.put_step(rec(1, diff=11, toc=12, last_used=10.0))
    index.put_step(rec(2, diff=21, toc=22, last_used=20.0))
    gz = BlobInfo(dg(13), 40, MEDIA_TYPES["gzip"])
    index.put_compressed(dg(11), "gzip", 6, "zlib-1.2.13", gz)
    index.put_compressed(dg(21), "gzip", 6, "zlib-1.2.13", BlobInfo(dg(23), 50, "x"))
    index.set_tag("app", dg(30), "{}", blobs=[dg(31), dg(23)])
    sizes = {dg(n): 10 for n in (11, 12, 13, 21, 22, 23, 30, 31)}
    assert index.referenced_blobs() == set(sizes)

    # a young record keeps its layer, TOC and compressed layer; old ones lose theirs
    plan = index.prune_plan(keep_bytes=None, keep_duration_s=15.0, now=30.0, blob_sizes=sizes)
    assert plan.step_keys == (key(1),)
    assert set(plan.blobs) == {dg(11), dg(12), dg(13)}

    # a zero byte cap removes every record, never the tagged image's blobs
    plan = index.prune_plan(keep_bytes=0, keep_duration_s=None, now=30.0, blob_sizes=sizes)
    assert plan.step_keys == (key(1), key(2))
    assert set(plan.blobs) == {dg(11), dg(12), dg(13), dg(21), dg(22)}
    assert plan.kept_bytes == 30  # manifest 30, config 31, compressed layer 23

    # meanwhile a new record needs one of the doomed blobs: apply_prune keeps it
    index.put_step(rec(3, diff=21, last_used=40.0))
    gone = index.apply_prune(plan)
    assert set(gone) == {dg(11), dg(12), dg(13), dg(22)}
    assert index.get_step(key(1)) is None and index.get_step(key(2)) is None
    assert index.get_step(key(3)) is not None
    assert index.get_compressed(dg(11), "gzip", 6, "zlib-1.2.13") is None  # its blob went
    assert index.get_compressed(dg(21), "gzip", 6, "zlib-1.2.13") is not None
    assert index.referenced_blobs() == {dg(21), dg(23), dg(30), dg(31)}


# -- the fast path -------------------------------------------------------------------------


def test_fastindex_agrees_with_index(index: Index, db: Path) -> None:
    index.put_step(rec(1, diff=11, toc=12, last_used=3.0))
    index.put_step(rec(2, last_used=4.0))
    index.touch_steps([key(1)], 9.0)
    index.set_tag("app", dg(5), '{"a": "b"}', blobs=[dg(7), dg(6)], now=2.0)
    rows = [
        StatEntry(f"/ctx/f{n}", n, 10 * n, 11 * n, 100 + n, 0o100644, f"{n:064x}")
        for n in range(700)
    ]
    rows.append(StatEntry("/ctx2/f1", 1, 2, 3, 4, 0o100755, "e" * 64))
    index.stat_put_many(rows)
    gz = BlobInfo(dg(40), 123, MEDIA_TYPES["gzip"])
    index.put_compressed(dg(11), "gzip", 3, "isal-1", gz)

    fast = FastIndex.open(db)
    assert fast is not None
    with fast:
        assert fast.get_compressed(dg(11), "gzip", 3, "isal-1") == gz
        assert fast.get_compressed(dg(11), "gzip", 3, "isal-1") == index.get_compressed(
            dg(11), "gzip", 3, "isal-1"
        )
        assert fast.get_compressed(dg(11), "gzip", 6, "isal-1") is None
        assert fast.get_compressed(dg(11), "zstd", 3, "isal-1") is None
        assert fast.get_step(key(1)) == index.get_step(key(1))
        assert fast.get_step(key(2)) == index.get_step(key(2))
        assert fast.get_step(key(3)) is None
        wanted = [key(1), key(2), key(3)]
        assert fast.get_steps(wanted) == index.get_steps(wanted)
        assert fast.has_steps(wanted) == {key(1), key(2)}
        assert fast.get_tag("app") == index.get_tag("app")
        assert fast.get_tag("nope") is None
        paths = [f"/ctx/f{n}" for n in range(0, 700, 3)] + ["/ctx/none"]
        assert fast.stat_get_many(paths) == index.stat_get_many(paths)
        assert len(fast.stat_get_many(paths)) == len(paths) - 1
        assert fast.stat_under("/ctx") == index.stat_under("/ctx")
        assert len(fast.stat_under("/ctx")) == 700
        # written after the fast index was opened: visible to its next query
        index.put_step(rec(4))
        assert fast.has_steps([key(4)]) == {key(4)}


def test_fastindex_declines_what_it_cannot_serve(tmp_path: Path) -> None:
    assert FastIndex.open(tmp_path / "missing.db") is None
    assert not (tmp_path / "missing.db").exists()  # and creates nothing
    assert FastIndex.open("postgresql://u@localhost/lbuild") is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert FastIndex.open(empty) is None


def test_fastpath_does_not_import_sqlalchemy(index: Index, db: Path) -> None:
    index.put_step(rec(1, diff=11))
    code = (
        "import sys\n"
        "from cache.index.reader import FastIndex\n"
        f"f = FastIndex.open({str(db)!r})\n"
        f"assert f is not None and f.get_step({key(1)!r}) is not None\n"
        "print('sqlalchemy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"
