"""A micro-benchmark of writing and reading back one layer tar (``cache.layers.tar``).

It generates a deterministic tree from a seeded PRNG (about 2,000 small files in nested
directories, a few symlinks, a hardlink, a name longer than 100 bytes, a non-ASCII name, one
10 MiB file), builds TOC entries for it the way ``builder/plan.py`` and ``builder/copy.py``
do (``source=ContentRef(host_path=...)``, the content's blake3 already known, uid/gid 0,
mtime 0), adds a few entries that exercise the other paths of the writer (whiteout, opaque
marker, inline data, xattrs, a big uid), then writes the layer with ``write_layer`` into a
fresh temporary ``BlobStore`` ``--runs`` times, writes it again with every file's content
read from that layer's blob (as ``COPY --from`` does) and reads its TOC back with ``read_toc``.

It prints the layer's diff_id, a digest of the TOC ``write_layer`` returned and the median
CPU time (``time.process_time``: user + system of this process) of each operation.  Layer
bytes are part of the cache's contract: the run fails (exit 1) when the diff_id is not
``EXPECTED_DIFF_ID`` (the bytes of ``TAR_WRITER_VERSION`` 1), or not ``--expect``'s.

    python bench/layer_bench.py --runs 7
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from blake3 import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's packages
from cache.layers.tar import read_toc, write_layer
from cache.store.blobs import BlobStore
from cache.types import ContentRef, Digest, Entry, LayerInfo

SEED = 20240611
SMALL_FILES = 2000
BIG_FILE = 10 << 20
EXPECTED_DIFF_ID = Digest("sha256:952562df85fce98585006efa2e06754fc822ca6e4245dfb38d05bedd4c1b39af")
"""The diff_id of this benchmark's layer; update it only together with TAR_WRITER_VERSION."""
DIRS = ("src", "src/app", "src/app/core", "src/lib", "deps", "deps/pkg", "docs", "config")


def generate_tree(root: Path, seed: int = SEED) -> None:
    """Write the benchmark's file tree under ``root`` (byte-identical for one seed)."""
    rng = random.Random(seed)
    dirs: list[str] = []
    for top in DIRS:
        for i in range(5):
            dirs.append(f"{top}/d{i:02d}")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(SMALL_FILES):
        d = dirs[rng.randrange(len(dirs))]
        size = rng.randrange(0, 14_000)
        (root / d / f"f{i:04d}.txt").write_bytes(rng.randbytes(size))
    long_dir = root / "src" / ("n" * 60)
    long_dir.mkdir()
    (long_dir / ("long-file-name-" * 4 + ".py")).write_bytes(rng.randbytes(3000))
    (root / "docs" / "résumé-ünïcode.md").write_bytes(rng.randbytes(2000))
    (root / "data.bin").write_bytes(rng.randbytes(BIG_FILE))
    os.symlink("d00/f0001.txt", root / "src" / "link-rel")
    os.symlink("/usr/bin/python3", root / "config" / "python")
    os.symlink("../" * 5 + "x" * 120, root / "deps" / "long-target")
    os.link(root / "data.bin", root / "data-hardlink.bin")


def _blake3_file(path: Path) -> str:
    h = blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest: str = h.hexdigest()
    return digest


def build_entries(root: Path) -> list[Entry]:
    """TOC entries for the tree, made as the builder makes a COPY's entries, plus extras."""
    entries: list[Entry] = []
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        base = "app" if rel_dir == "." else f"app/{rel_dir}"
        entries.append(Entry(path=base, type="dir", mode=0o755))
        for name in sorted(filenames):
            path = root / rel_dir / name
            rel = f"{base}/{name}"
            st = path.lstat()
            if path.is_symlink():
                entries.append(Entry(path=rel, type="symlink", mode=0o777, link=os.readlink(path)))
            elif (st.st_dev, st.st_ino) in inodes:
                entries.append(
                    Entry(path=rel, type="hardlink", link=inodes[(st.st_dev, st.st_ino)])
                )
            else:
                if st.st_nlink > 1:
                    inodes[(st.st_dev, st.st_ino)] = rel
                entries.append(
                    Entry(
                        path=rel,
                        type="file",
                        mode=st.st_mode & 0o7777,
                        size=st.st_size,
                        digest=_blake3_file(path),
                        source=ContentRef(host_path=str(path)),
                    )
                )
    entries += [
        Entry(path=".", type="dir", mode=0o755),
        Entry(path="etc", type="dir", mode=0o755, mtime=1_700_000_000),
        Entry(path="etc/gone", type="whiteout"),
        Entry(path="var", type="opaque", mtime=5),
        Entry(path="var", type="dir", mode=0o1777, uid=0o10000000, gid=7),
        Entry(
            path="etc/motd",
            type="file",
            mode=0o600,
            size=6,
            xattrs=(("user.b", b"2"), ("user.a", b"1")),
            source=ContentRef(data=b"hello\n"),
        ),
        Entry(path="dev", type="dir", mode=0o755),
        Entry(path="dev/null", type="char", mode=0o666, devmajor=1, devminor=3),
        Entry(path="dev/fifo", type="fifo", mode=0o600),
    ]
    random.Random(SEED).shuffle(entries)  # write_layer sorts: callers may pass any order
    return entries


def _toc_digest(toc: tuple[Entry, ...]) -> str:
    """A digest of the TOC's repr: it must not change either (offsets, digests, order)."""
    return hashlib.sha256(repr(toc).encode()).hexdigest()[:16]


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _median_ms(times: list[float]) -> str:
    return f"median CPU {statistics.median(times) * 1000:.1f} ms over {len(times)} runs"


def from_blob(toc: tuple[Entry, ...], diff_id: Digest) -> list[Entry]:
    """The TOC's entries with their content read back from the layer blob, as a COPY --from
    of a stage does (``builder/solve.py``): writing them must give the same layer."""
    return [
        replace(e, source=ContentRef(blob=diff_id, offset=e.offset)) if e.type == "file" else e
        for e in toc
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each operation")
    ap.add_argument(
        "--expect", default=EXPECTED_DIFF_ID, help="exit 1 unless the diff_id is this digest"
    )
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="layer-bench-"))
    try:
        tree = scratch / "tree"
        tree.mkdir()
        generate_tree(tree)
        entries = build_entries(tree)
        infos: list[LayerInfo] = []

        def write_once(entries: list[Entry], store: BlobStore) -> None:
            infos.append(write_layer(entries, store))

        home = BlobStore(scratch / "home")
        write_once(entries, home)  # warms the page cache and the imports
        info = infos[0]
        writes, blob_writes, reads = [], [], []
        for i in range(args.runs):
            store = BlobStore(scratch / f"store{i}")
            writes.append(_cpu(functools.partial(write_once, entries, store)))
            shutil.rmtree(store.root)
        copies = from_blob(info.toc, info.diff_id)
        for _ in range(args.runs):
            # into the store that holds the source blob: the same layer is committed again
            blob_writes.append(_cpu(functools.partial(write_once, copies, home)))
        for _ in range(args.runs):
            with home.open(info.diff_id) as f:
                reads.append(_cpu(functools.partial(read_toc, f)))
        with home.open(info.diff_id) as f:
            toc = read_toc(f)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = sum(1 for e in info.toc if e.type == "file")
    print(f"entries: {len(info.toc)} ({files} files), tar size: {info.size} bytes")
    print(f"diff_id: {info.diff_id}")
    print(f"toc:     {_toc_digest(info.toc)}")
    print(f"write_layer (host files): {_median_ms(writes)}")
    print(f"write_layer (from blob):  {_median_ms(blob_writes)}")
    print(f"read_toc:                 {_median_ms(reads)}")
    if any(li != info for li in infos):
        print("error: runs wrote different layers", file=sys.stderr)
        return 1
    if toc != info.toc:
        print("error: read_toc differs from write_layer's TOC", file=sys.stderr)
        return 1
    if Digest(args.expect) != info.diff_id:
        print(f"error: diff_id differs from the expected {args.expect}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
