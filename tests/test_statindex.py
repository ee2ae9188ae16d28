"""Tests of the stat index (cache.index.statindex) on real files and a real SQLite index."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from cache.errors import InvalidInput
from cache.index.records import Index
from cache.index.statindex import StatIndex

OLD_NS = 1_000_000_000 * 1_600_000_000  # 2020: a timestamp nobody will call racy


def b3(path: Path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def counting(
    fn: Callable[[Path], str],
) -> tuple[Callable[[Path, os.stat_result], str], list[Path]]:
    reads: list[Path] = []

    def wrapped(p: Path, st: os.stat_result) -> str:  # a hasher gets the walk's stat too
        reads.append(p)
        return fn(p)

    return wrapped, reads


def make(path: Path, data: bytes = b"hello\n", mtime_ns: int = OLD_NS) -> os.stat_result:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path.lstat()


def altered(st: os.stat_result, **change: int) -> os.stat_result:
    """``st`` with one stat field changed, everything else as it was."""
    fields = {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_size": st.st_size,
        "st_mtime_ns": st.st_mtime_ns,
        "st_ctime_ns": st.st_ctime_ns,
    }
    fields.update(change)
    seq = [*st[:10], st.st_atime, st.st_mtime, st.st_ctime, st.st_atime_ns]
    seq[0], seq[1], seq[6] = fields["st_mode"], fields["st_ino"], fields["st_size"]
    return os.stat_result([*seq, fields["st_mtime_ns"], fields["st_ctime_ns"]])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "lbuild.db"


def test_record_then_lookup_hits_and_persists(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "ctx" / "a.txt"
    st = make(f)
    with StatIndex.open(db, racy_ns=0) as si:
        assert si.lookup(f, st) is None
        assert si.record(f, st, b3(f)) is True
        assert si.lookup(f, st) == b3(f)
    with StatIndex.open(db, racy_ns=0) as si:  # a new process would see the same
        assert si.lookup(f, f.lstat()) == b3(f)
        assert si.lookup(str(f), f.lstat()) == b3(f)  # str and Path name the same row
        assert (si.hits, si.misses) == (2, 0)


@pytest.mark.parametrize("field", ["st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_mode"])
def test_each_stat_field_change_misses(tmp_path: Path, db: Path, field: str) -> None:
    f = tmp_path / "a"
    st = make(f)
    with StatIndex.open(db, racy_ns=0) as si:
        si.record(f, st, "1" * 64)
        assert si.lookup(f, st) == "1" * 64
        assert si.lookup(f, altered(st, **{field: getattr(st, field) + 1})) is None
        assert si.lookup(tmp_path / "b", st) is None  # another path, same stat


def test_real_file_changes_miss(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "a"
    st = make(f, b"one\n")
    with StatIndex.open(db, racy_ns=0) as si:
        si.record(f, st, b3(f))
        # same size, same mtime restored, new bytes: ctime gives it away (once the
        # kernel's coarse clock has ticked; within one tick this is the racy case)
        time.sleep(0.05)
        f.write_bytes(b"two\n")
        os.utime(f, ns=(OLD_NS, OLD_NS))
        assert f.lstat().st_mtime_ns == st.st_mtime_ns and f.lstat().st_size == st.st_size
        assert si.lookup(f, f.lstat()) is None
        si.record(f, f.lstat(), b3(f))
        # chmod
        f.chmod(0o755)
        assert si.lookup(f, f.lstat()) is None
        si.record(f, f.lstat(), b3(f))
        # replaced by another file (new inode) with equal size, mode and mtime
        g = tmp_path / "g"
        make(g, b"thr\n")
        g.chmod(0o755)
        os.replace(g, f)
        assert si.lookup(f, f.lstat()) is None
        si.record(f, f.lstat(), b3(f))
        assert si.lookup(f, f.lstat()) == b3(f)


def test_hasher_reads_only_changed_files(tmp_path: Path, db: Path) -> None:
    ctx = tmp_path / "ctx"
    files = [ctx / f"d{n % 3}" / f"f{n}" for n in range(30)]
    for n, f in enumerate(files):
        make(f, f"content {n}\n".encode())
    fallback, reads = counting(b3)

    with StatIndex.open(db, racy_ns=0) as si:
        h = si.hasher(fallback)
        first = {f: h(f, f.lstat()) for f in files}
        assert first == {f: b3(f) for f in files}
        assert len(reads) == 30 and si.hashed == 30

    reads.clear()
    make(files[4], b"edited\n")
    with StatIndex.open(db, racy_ns=0) as si:
        assert si.prefetch(ctx) == 30
        h = si.hasher(fallback)
        second = {f: h(f, f.lstat()) for f in files}
    assert reads == [files[4]]
    assert second[files[4]] == b3(files[4]) != first[files[4]]
    assert all(second[f] == first[f] for f in files if f != files[4])


def test_racy_files_are_not_recorded(tmp_path: Path, db: Path) -> None:
    f = tmp_path / "fresh"
    f.write_bytes(b"just written\n")  # mtime and ctime are now
    st = f.lstat()
    fallback, reads = counting(b3)
    with StatIndex.open(db) as si:  # the default racy window
        h = si.hasher(fallback)
        assert h(f, st) == b3(f)
        assert h(f, st) == b3(f)
        assert len(reads) == 2  # hashed twice: the first answer was not trusted
        assert si.is_racy(st, time.time_ns())
        # seen long after it was last changed, the same stat is trustworthy
        later = max(st.st_mtime_ns, st.st_ctime_ns) + 10_000_000_000
        assert si.record(f, st, b3(f), observed_ns=later) is True
        assert si.lookup(f, st) == b3(f)
        # a racy record drops what was known, so an older row cannot answer
        assert si.record(f, st, "0" * 64) is False
        assert si.lookup(f, st) is None


def test_prefetch_loads_one_directory_only(tmp_path: Path, db: Path) -> None:
    inside = [make(tmp_path / "ctx" / "a"), make(tmp_path / "ctx" / "sub" / "b")]
    sibling = make(tmp_path / "ctx2" / "c")
    names = [tmp_path / "ctx" / "a", tmp_path / "ctx" / "sub" / "b", tmp_path / "ctx2" / "c"]
    with StatIndex.open(db, racy_ns=0) as si:
        for p, st in zip(names, [*inside, sibling], strict=True):
            si.record(p, st, "f" * 64)
    with StatIndex.open(db, racy_ns=0) as si:
        assert si.prefetch(tmp_path / "ctx") == 2
        assert si.prefetch(str(tmp_path / "ctx") + "/") == 2
        # outside the prefetched directory a lookup still asks the database
        assert si.lookup(names[2], sibling) == "f" * 64
        assert si.lookup(names[0], inside[0]) == "f" * 64
        assert si.lookup(tmp_path / "ctx" / "new", inside[0]) is None


def test_records_are_written_in_batches(tmp_path: Path, db: Path) -> None:
    files = [tmp_path / f"f{n}" for n in range(5)]
    stats = [make(f) for f in files]
    with Index.open(db) as reader, StatIndex.open(db, batch_size=3, racy_ns=0) as si:
        for f, st in zip(files, stats, strict=True):
            si.record(f, st, "a" * 64)
        assert len(reader.stat_get_many(str(f) for f in files)) == 3  # one batch went out
        si.flush()
        assert len(reader.stat_get_many(str(f) for f in files)) == 5


def test_over_an_open_index(tmp_path: Path, db: Path) -> None:
    """The form used with a non-SQLite index (no fast path): reads and writes via Index."""
    f = tmp_path / "a"
    st = make(f)
    with Index.open(db) as idx:
        with StatIndex(idx, racy_ns=0) as si:
            si.record(f, st, "c" * 64)
        # closing the stat index flushed it and left the Index open
        assert idx.stat_get_many([str(f)])[str(f)].blake3 == "c" * 64
        with StatIndex(idx, racy_ns=0) as si:
            assert si.lookup(f, st) == "c" * 64
    with pytest.raises(ValueError):
        StatIndex()


def test_noop_lookups_do_not_import_sqlalchemy(tmp_path: Path, db: Path) -> None:
    ctx = tmp_path / "ctx"
    files = [ctx / f"f{n}" for n in range(20)]
    with StatIndex.open(db, racy_ns=0) as si:
        for f in files:
            si.record(f, make(f), b3(f))
    code = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "from cache.index.statindex import StatIndex\n"
        "def boom(p, st):\n"
        "    raise AssertionError(f'read {p}')\n"
        f"with StatIndex.open({str(db)!r}, racy_ns=0) as si:\n"
        f"    si.prefetch({str(ctx)!r})\n"
        "    h = si.hasher(boom)\n"
        f"    for name in sorted(os.listdir({str(ctx)!r})):\n"
        f"        p = Path({str(ctx)!r}) / name\n"
        "        h(p, p.lstat())\n"
        "    assert si.hits == 20, si.hits\n"
        "print('sqlalchemy' in sys.modules, 'cache.index.records' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split() == ["False", "True"]


def test_many_hashes_on_threads_with_the_same_answers(tmp_path: Path, db: Path) -> None:
    files = [tmp_path / "ctx" / f"d{n % 4}" / f"f{n}" for n in range(100)]
    for n, f in enumerate(files):
        make(f, f"content {n}\n".encode() * (n + 1))
    fallback, reads = counting(b3)
    with StatIndex.open(db, racy_ns=0) as si:
        h = si.hasher(fallback)
        assert len(files) >= h.PARALLEL_MIN_FILES  # the threaded branch
        got = h.many([(f, f.lstat()) for f in files])
        assert got == [b3(f) for f in files]
        assert sorted(map(str, reads)) == sorted(map(str, files)) and si.hashed == 100

    reads.clear()
    make(files[7], b"edited\n")
    with StatIndex.open(db, racy_ns=0) as si:
        assert si.prefetch(tmp_path / "ctx") == 100
        again = si.hasher(fallback).many([(f, f.lstat()) for f in files])
    assert [str(p) for p in reads] == [str(files[7])]
    assert again[7] == b3(files[7]) != got[7]
    assert again[:7] + again[8:] == got[:7] + got[8:]


def test_many_does_not_record_racy_files(tmp_path: Path, db: Path) -> None:
    files = [tmp_path / "fresh" / f"f{n}" for n in range(40)]
    for f in files:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(f.name.encode())  # mtime and ctime are now
    fallback, reads = counting(b3)
    with StatIndex.open(db) as si:
        h = si.hasher(fallback)
        for _ in range(2):
            assert h.many([(f, f.lstat()) for f in files]) == [b3(f) for f in files]
    assert len(reads) == 80  # nothing was trusted: every file read both times


def test_many_on_threads_raises_the_first_failing_file_in_order(tmp_path: Path, db: Path) -> None:
    files = [tmp_path / "ctx" / f"f{n}" for n in range(64)]
    for f in files:
        make(f, f.name.encode())
    bad = {str(files[40]), str(files[9])}

    def fallback(path: str | os.PathLike[str], st: os.stat_result) -> str:
        if str(path) in bad:
            raise InvalidInput(f"cannot read {path}")
        return b3(Path(path))

    with StatIndex.open(db, racy_ns=0) as si:
        with pytest.raises(InvalidInput, match=re.escape(f"cannot read {files[9]}") + "$"):
            si.hasher(fallback).many([(f, f.lstat()) for f in files])
        assert si.hashed == 0  # nothing recorded from a failed batch


def test_many_hashes_cached_files_here_and_the_others_on_threads(tmp_path: Path, db: Path) -> None:
    """``quick`` answers for the files in the page cache; only the ones it declines are read
    through ``fallback`` (on threads when there are enough), with the same answers."""
    import threading

    files = [tmp_path / "ctx" / f"f{n}" for n in range(120)]
    for n, f in enumerate(files):
        make(f, f"content {n}\n".encode() * (n + 1))
    declined = {str(f) for f in files[::3]}  # 40: the threaded branch
    quick_threads: set[str] = set()

    def quick(path: str | os.PathLike[str], st: os.stat_result) -> str | None:
        quick_threads.add(threading.current_thread().name)
        return None if str(path) in declined else b3(Path(path))

    fallback, reads = counting(b3)
    with StatIndex.open(db, racy_ns=0) as si:
        h = si.hasher(fallback, quick)
        assert len(declined) >= h.PARALLEL_MIN_FILES
        assert h.many([(f, f.lstat()) for f in files]) == [b3(f) for f in files]
        assert sorted(map(str, reads)) == sorted(declined) and si.hashed == 120
    assert quick_threads == {threading.current_thread().name}
    # errors: the first failing file in order wins, whichever path it took
    bad_quick, bad_slow = str(files[10]), str(files[6])  # files[6] is declined

    def failing_quick(path: str | os.PathLike[str], st: os.stat_result) -> str | None:
        if str(path) == bad_quick:
            raise InvalidInput(f"cannot read {path}")
        return quick(path, st)

    def failing_fallback(path: str | os.PathLike[str], st: os.stat_result) -> str:
        if str(path) == bad_slow:
            raise InvalidInput(f"cannot read {path}")
        return b3(Path(path))

    for f in files:
        make(f, b"changed " + f.name.encode())
    with StatIndex.open(db, racy_ns=0) as si:
        h = si.hasher(failing_fallback, failing_quick)
        with pytest.raises(InvalidInput, match=re.escape(f"cannot read {bad_slow}") + "$"):
            h.many([(f, f.lstat()) for f in files])
        files_after = [f for f in files if str(f) != bad_slow]
        with pytest.raises(InvalidInput, match=re.escape(f"cannot read {bad_quick}") + "$"):
            h.many([(f, f.lstat()) for f in files_after])


def test_hash_file_if_cached_declines_what_is_not_in_the_page_cache(tmp_path: Path) -> None:
    from builder.plan.context import hash_file, hash_file_if_cached

    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: its pages are the file and are never dropped")
    for size in (0, 5000, (3 << 20) + 3):
        f = tmp_path / f"f{size}"
        f.write_bytes(os.urandom(size))
        assert hash_file_if_cached(f, f.lstat()) == hash_file(f) == b3(f)
        if size == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert hash_file_if_cached(f, f.lstat()) is None  # it would wait for the disk
        assert hash_file(f, f.lstat()) == b3(f)
        assert hash_file_if_cached(f, f.lstat()) == b3(f)  # read since: cached again


def test_hash_file_if_cached_on_a_filesystem_that_cannot_tell(tmp_path: Path) -> None:
    """overlayfs answers RWF_NOWAIT with EOPNOTSUPP (a context inside a container): every file
    of it goes to the waiting path, and its device is not asked again."""
    from builder.plan import context
    from builder.plan.context import hash_file_if_cached

    if os.geteuid() != 0:
        pytest.skip("mounting an overlay needs root")
    for d in ("l", "u", "w", "m"):
        (tmp_path / d).mkdir()
    (tmp_path / "l" / "f").write_bytes(b"lower\n")
    m = tmp_path / "m"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path / 'l'},upperdir={tmp_path / 'u'},"
                    f"workdir={tmp_path / 'w'}", str(m)], check=True)  # fmt: skip
    try:
        st = (m / "f").lstat()
        if st.st_dev in context._cannot_tell:
            context._cannot_tell.discard(st.st_dev)
        fd = os.open(m / "f", os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(8)], 0, os.RWF_NOWAIT)
        except OSError as e:
            supported = e.errno not in (95, 22, 38)
        else:
            supported = True
        finally:
            os.close(fd)
        if supported:
            pytest.skip("this kernel's overlayfs answers RWF_NOWAIT")
        assert hash_file_if_cached(m / "f", st) is None
        assert st.st_dev in context._cannot_tell
        gone = m / "gone"
        gone.write_bytes(b"x")
        gone_st = gone.lstat()
        gone.unlink()  # opening it would raise NotFound: it is not opened at all
        assert hash_file_if_cached(gone, gone_st) is None
        (m / "g").write_bytes(b"x")
        with StatIndex.open(tmp_path / "db" / "lbuild.db", racy_ns=0) as si:
            h = si.hasher(context.hash_file, hash_file_if_cached)
            files = [(m / "f", (m / "f").lstat()), (m / "g", (m / "g").lstat())]
            assert h.many(files) == [b3(m / "f"), b3(m / "g")]
    finally:
        subprocess.run(["umount", str(m)], check=True)
