"""A damaged SQLite index: found by ``cache verify`` (SQLite's integrity check) and set aside
by ``cache verify --repair``, which salvages every row it can still read into a new index.

The index is a cache of what builds learnt: losing rows costs rebuilds, never correctness
(a step record whose blobs are gone is a miss).  So a repair keeps the damaged file (renamed
``lbuild.db.damaged-<unix time>``, with its WAL) for inspection, creates a fresh index, and
copies into it the rows of each table that can still be read, table by table and, where a
table is damaged, row by row up to the damage.  The stat index (a pure cache of file hashes)
is not copied.  Uses the stdlib ``sqlite3`` only; the new schema is made by ``Index``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from cache.errors import StoreError
from cache.index.db import REPAIR_HINT, is_damage

__all__ = [
    "REPAIR_HINT",
    "damaged_error",
    "integrity_problems",
    "is_damage",
    "repair",
    "verify_index",
]


SALVAGED_TABLES = ("steps", "step_sites", "compressed", "tags", "tag_blobs", "builds")
"""Tables copied by a repair, parents before children (foreign keys)."""


def damaged_error(db: Path, e: BaseException | str) -> StoreError:
    """The one line a command prints when it meets a damaged index."""
    detail = str(getattr(e, "orig", None) or e).splitlines()[0] if str(e) else "damaged"
    return StoreError(f"the cache index {db} is damaged: {detail}", hint=REPAIR_HINT)


def integrity_problems(db: Path, limit: int = 5) -> list[str]:
    """SQLite's ``integrity_check`` of ``db``: [] when it is sound (or absent), else up to
    ``limit`` lines describing the damage."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.DatabaseError as e:
        return [str(e)]
    try:
        rows = con.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()
    except sqlite3.DatabaseError as e:
        return [str(e)]
    finally:
        con.close()
    lines = [str(r[0]) for r in rows]
    return [] if lines == ["ok"] else lines


def repair(db: Path) -> list[str]:
    """Set the damaged index ``db`` aside and salvage what can be read into a new one.

    Returns findings, one line each.  The caller holds the home's exclusive lock.
    """
    from cache.index.records import Index

    aside = db.with_name(f"{db.name}.damaged-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            os.replace(src, f"{aside}{suffix}")
    findings = [f"damaged index set aside as {aside.name}"]
    Index.open(str(db)).close()  # the current schema, empty
    try:
        con = sqlite3.connect(str(db), timeout=30, isolation_level=None)
    except sqlite3.DatabaseError as e:  # pragma: no cover - a fresh file
        raise StoreError(f"cannot open the new cache index {db}: {e}") from None
    try:
        try:
            con.execute("ATTACH DATABASE ? AS old", (f"file:{aside}?mode=ro",))
            old_tables = {
                r[0] for r in con.execute("SELECT name FROM old.sqlite_master WHERE type='table'")
            }
        except sqlite3.DatabaseError as e:
            findings.append(f"nothing could be salvaged ({e}): builds will fill the index again")
            return findings
        for table in SALVAGED_TABLES:
            if table not in old_tables:
                continue
            findings.append(_salvage(con, table))
        # rows whose parent row was lost with the damage
        con.execute("DELETE FROM main.step_sites WHERE key NOT IN (SELECT key FROM main.steps)")
        con.execute("DELETE FROM main.tag_blobs WHERE tag NOT IN (SELECT name FROM main.tags)")
    finally:
        con.close()
    left = integrity_problems(db)
    if left:
        raise StoreError(f"the repaired cache index {db} is not sound: {left[0]}")
    return findings


def _salvage(con: sqlite3.Connection, table: str) -> str:
    """Copy ``old.table`` into ``main.table``: all at once, else row by row to the damage."""
    new_cols = [r[1] for r in con.execute(f"PRAGMA main.table_info({table})")]
    old_cols = {r[1] for r in con.execute(f"PRAGMA old.table_info({table})")}
    cols = ", ".join(c for c in new_cols if c in old_cols)
    try:
        con.execute("BEGIN")
        cur = con.execute(
            f"INSERT OR IGNORE INTO main.{table} ({cols}) SELECT {cols} FROM old.{table}"
        )
        con.execute("COMMIT")
        return f"table {table}: {cur.rowcount} rows salvaged"
    except sqlite3.DatabaseError:
        _rollback(con)
    rows: list[tuple[object, ...]] = []
    try:  # read first (up to the damage), then write: a failed read spoils its transaction
        for row in con.execute(f"SELECT {cols} FROM old.{table}"):
            rows.append(tuple(row))
    except sqlite3.DatabaseError:
        pass  # the damage: what was read before it is kept
    marks = ", ".join("?" * len(cols.split(", ")))
    con.execute("BEGIN")
    con.executemany(f"INSERT OR IGNORE INTO main.{table} ({cols}) VALUES ({marks})", rows)
    con.execute("COMMIT")
    return (
        f"table {table}: {len(rows)} rows salvaged, the rest was unreadable (builds make it again)"
    )


def _rollback(con: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.DatabaseError):  # no transaction left to roll back
        con.execute("ROLLBACK")


def verify_index(home: Path | None, *, repair_it: bool) -> list[str]:
    """``cache verify``'s first check: the index's integrity, under the home's exclusive lock.

    A damaged index raises the one-line ``StoreError`` with the repair hint, or with
    ``repair_it`` is set aside and salvaged (findings returned).
    """
    from cache.home import Home, ensure_home, home_dir, lock_home

    h = ensure_home(home_dir(home))
    db = Home(h).db
    with lock_home(h, exclusive=True):
        problems = integrity_problems(db)
        if not problems:
            return []
        if not repair_it:
            raise damaged_error(db, problems[0])
        return repair(db)
