"""A damaged index (issue 11 item 10): ``cache verify`` runs SQLite's integrity check, every
command meeting the damage says so in one line with the fix, and ``cache verify --repair``
sets the damaged file aside and salvages what it still holds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
from util import lbuild, manifest_digest, write_files

HINT = "(hint: run `lbuild cache verify --repair`)"
FILES: dict[str, str | bytes] = {
    "Dockerfile": "FROM scratch\nCOPY a /a\nENV E=1\nCOPY b /b\n",
    "a": "a\n",
    "b": "b\n",
}


def _build(ctx: Path, home: Path, out: Path) -> dict[str, bool]:
    p = lbuild("build", ctx, "--progress", "json", "-o", f"type=oci,dest={out}", home=home)
    events = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    return {e["name"]: e["cached"] for e in events if e.get("event") == "step_done"}


def _damage_page_of(home: Path, name: str) -> None:
    """Overwrite the root b-tree page of table or index ``name`` with garbage."""
    db = home / "lbuild.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        (root,) = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
    con.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)


def _lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [x for x in p.stderr.splitlines() if x.strip()]


@pytest.fixture
def built(tmp_path: Path, home: Path) -> tuple[Path, str]:
    ctx = tmp_path / "ctx"
    write_files(ctx, FILES)
    assert not any(_build(ctx, home, tmp_path / "clean").values())
    return ctx, manifest_digest(tmp_path / "clean")


def test_damaged_table_is_reported_and_repaired(
    tmp_path: Path, home: Path, built: tuple[Path, str]
) -> None:
    ctx, clean = built
    _damage_page_of(home, "steps")
    db = home / "lbuild.db"

    p = lbuild("cache", "verify", home=home, check=False)
    assert p.returncode == 1
    assert _lines(p) == [
        f"lbuild: error: the cache index {db} is damaged: database disk image is malformed {HINT}"
    ]
    (ctx / "b").write_text("edited\n")  # a build that must read and write step records
    p = lbuild("build", ctx, home=home, check=False)
    assert p.returncode == 1
    assert len(_lines(p)) == 1 and _lines(p)[0].endswith(HINT), p.stderr
    assert "internal error" not in p.stderr and "Traceback" not in p.stderr
    (ctx / "b").write_text("b\n")

    p = lbuild("cache", "verify", "--repair", home=home)
    out = p.stdout.splitlines()
    assert out[0].startswith("damaged index set aside as lbuild.db.damaged-")
    assert any(line.startswith("table steps: ") for line in out)
    assert len(list(home.glob("lbuild.db.damaged-*"))) >= 1
    assert lbuild("cache", "verify", home=home).stdout.splitlines() == [
        "cache verified: no corruption"
    ]
    # the lost records are built again, to the same image
    _build(ctx, home, tmp_path / "after")
    assert manifest_digest(tmp_path / "after") == clean


def test_damaged_index_page_loses_no_record(
    tmp_path: Path, home: Path, built: tuple[Path, str]
) -> None:
    ctx, clean = built
    with sqlite3.connect(home / "lbuild.db") as con:
        (n,) = con.execute("SELECT count(*) FROM steps").fetchone()  # step + layer records
    con.close()
    _damage_page_of(home, "ix_steps_last_used")
    assert lbuild("cache", "verify", home=home, check=False).returncode == 1
    out = lbuild("cache", "verify", "--repair", home=home).stdout.splitlines()
    assert f"table steps: {n} rows salvaged" in out
    cached = _build(ctx, home, tmp_path / "after")
    assert cached and all(cached.values())  # every record survived the repair
    assert manifest_digest(tmp_path / "after") == clean
