"""Tests for cache.store.blobs: the content-addressed store (real files, real processes)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cache.errors import DigestMismatch, InvalidInput, NotFound
from cache.store.blobs import BlobStore
from cache.types import Digest, sha256_digest

REPO = Path(__file__).resolve().parents[1]


def sha(data: bytes) -> Digest:
    return sha256_digest(hashlib.sha256(data).hexdigest())


def test_put_read_and_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = store.put(b"hello")
    assert d == sha(b"hello")
    p = tmp_path / "blobs" / "sha256" / d.split(":")[1]
    assert store.path(d) == p
    assert p.read_bytes() == b"hello"
    assert stat.S_IMODE(p.stat().st_mode) == 0o444
    assert store.has(d) and store.read(d) == b"hello" and store.size(d) == 5
    assert store.verify(d)
    assert list(store.digests()) == [d]
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left in the ingest area


def test_ingest_streams_and_reports_digest_and_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with store.ingest(expected=sha(b"abcdef")) as w:
        w.write(b"abc")
        assert w.size == 3
        w.write(memoryview(b"def"))
    assert w.digest == sha(b"abcdef") and w.size == 6
    with store.open(w.digest) as f:
        assert f.read() == b"abcdef"


def test_ingest_mismatch_commits_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(DigestMismatch) as info, store.ingest(expected=sha(b"other")) as w:
        w.write(b"data")
    assert info.value.actual == sha(b"data")
    assert not store.has(sha(b"data"))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_ingest_exception_removes_tmp(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(RuntimeError), store.ingest() as w:
        w.write(b"partial")
        raise RuntimeError("boom")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert list(store.digests()) == []


def test_already_present_is_success_and_keeps_inode(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = store.put(b"same")
    ino = store.path(d).stat().st_ino
    assert store.put(b"same") == d
    assert store.path(d).stat().st_ino == ino


def test_putting_a_present_blob_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No temp copy and no fsync for bytes the store has (a build's oci-layout base put its
    config and manifest again on every build)."""
    store = BlobStore(tmp_path)
    d = store.put(b"config")
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    made: list[str] = []
    mkstemp = tempfile.mkstemp
    monkeypatch.setattr(
        tempfile, "mkstemp", lambda *a, **k: (lambda r: (made.append(r[1]), r)[1])(mkstemp(*a, **k))
    )
    assert store.put(b"config") == d
    assert (synced, made) == ([], [])
    assert store.put(b"other") != d  # a new blob is still written and fsynced
    assert len(made) == 1 and synced


def test_corrupt_blob_is_detected_and_replaced_by_reingest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    d = store.put(b"good bytes")
    p = store.path(d)
    os.chmod(p, 0o644)
    p.write_bytes(b"bad")  # different size: a re-ingest must repair it
    assert not store.verify(d)
    assert store.put(b"good bytes") == d
    assert store.verify(d)


def test_missing_and_invalid(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    missing = sha(b"nope")
    assert not store.has(missing)
    with pytest.raises(NotFound):
        store.open(missing)
    with pytest.raises(NotFound):
        store.size(missing)
    with pytest.raises(InvalidInput):
        store.path(Digest("md5:abc"))
    store.remove(missing)  # removing what is not there is fine
    d = store.put(b"x")
    store.remove(d)
    assert not store.has(d)


def test_sweep_tmp_removes_only_old_ingest_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    tmp = tmp_path / "tmp"
    old = tmp / "ingest-old"
    fresh = tmp / "ingest-fresh"
    foreign = tmp / "someone-elses-work"
    for p in (old, fresh, foreign):
        p.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(foreign, (past, past))
    store.sweep_tmp(older_than_s=3600)
    assert not old.exists()
    assert fresh.exists() and foreign.exists()


def test_sweep_does_not_break_a_live_ingest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with store.ingest() as w:
        w.write(b"live")
        store.sweep_tmp(older_than_s=0.5)  # the live file is younger than that
    assert store.read(w.digest) == b"live"


_WRITER = """
import sys, hashlib
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from cache.store.blobs import BlobStore
store = BlobStore(Path(sys.argv[2]))
chunk = bytes(range(256)) * 4096
expected = "sha256:" + hashlib.sha256(chunk * 16).hexdigest()
for _ in range(5):
    with store.ingest(expected=expected) as w:
        for _ in range(16):
            w.write(chunk)
print(w.digest)
"""


def test_concurrent_ingest_of_same_blob_from_processes(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(REPO), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e for _, e in outs]
    digests = {o.decode().strip() for o, _ in outs}
    assert len(digests) == 1
    store = BlobStore(tmp_path)
    d = Digest(digests.pop())
    assert store.verify(d)
    assert store.size(d) == 16 * 256 * 4096
    assert list((tmp_path / "tmp").iterdir()) == []


class _CountingSha:
    """hashlib.sha256 that counts how many hashes ``check_out`` started."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = hashlib.sha256

    def __call__(self, *a: bytes) -> hashlib._Hash:
        self.calls += 1
        return self._real(*a)


def test_check_out_stamp_spares_the_rehash_until_the_blob_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cache.store.blobs as blobs
    from cache.errors import CorruptBlob

    data = bytes(range(256)) * 400
    d = BlobStore(tmp_path).put(data)
    counting = _CountingSha()
    monkeypatch.setattr(blobs.hashlib, "sha256", counting)
    monkeypatch.setattr(blobs, "_RACY_S", 0.0)  # the blob's mtime counts as old already
    BlobStore(tmp_path).check_out(d)  # another process: it hashes, then stamps
    assert counting.calls == 1
    p = tmp_path / "blobs" / "sha256" / d.split(":")[1]
    os.link(p, tmp_path / "exported")  # an export's hard link, made and removed
    (tmp_path / "exported").unlink()
    BlobStore(tmp_path).check_out(d)  # the stamp still matches the file: no hash
    assert counting.calls == 1
    # one byte changed in place, the same size
    time.sleep(0.05)  # past the coarse timestamp of the write that made the blob
    p.chmod(0o644)
    with open(p, "r+b") as f:
        f.seek(7)
        f.write(b"\xff")
    with pytest.raises(CorruptBlob):
        BlobStore(tmp_path).check_out(d)
    assert counting.calls == 2
    assert not p.exists() and not (tmp_path / "blobs" / "verified" / p.name).exists()


def test_check_out_stamps_no_blob_changed_moments_ago(tmp_path: Path) -> None:
    # an mtime younger than the timestamps' granularity could survive another write
    d = BlobStore(tmp_path).put(b"fresh" * 1000)
    BlobStore(tmp_path).check_out(d)
    assert not (tmp_path / "blobs" / "verified" / d.split(":")[1]).exists()
