"""Micro-benchmark of the layer tar reader (cache/layers/tarread.py) on a 2,000-file layer.

Times ``read_toc`` (the TOC of every COPY and import) and ``builder.compare.tarscan.scan``
(what ``lbuild diff`` reads) on an in-memory tar of 2,000 small files in 20 directories,
written by ``tarfile`` in GNU and in PAX format (every tenth PAX member has an ``atime``
record).  Prints the minimum and median CPU time (``time.process_time``) of ``--runs`` reads.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import time
from collections.abc import Callable


def layer(pax: bool) -> bytes:
    buf = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for d in range(20):
            ti = tarfile.TarInfo(f"app/src/d{d:02}")
            ti.type, ti.mode, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, "root", "root"
            t.addfile(ti)
            for i in range(100):
                data = (f"file {d} {i}\n" * (1 + i % 7)).encode()
                ti = tarfile.TarInfo(f"app/src/d{d:02}/f{i:03}.py")
                ti.size, ti.mtime = len(data), 1700000000 + i
                if pax and i % 10 == 0:
                    ti.pax_headers = {"atime": "1700000000.5"}
                t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    from builder.compare.tarscan import scan
    from cache.layers.tarread import read_toc

    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=30)
    runs = ap.parse_args().runs
    for label, data in (("gnu", layer(False)), ("pax", layer(True))):
        readers: dict[str, Callable[..., object]] = {
            "read_toc": lambda d=data: read_toc(io.BytesIO(d)),
            "diff scan": lambda d=data: list(scan(io.BytesIO(d))),
        }
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(runs):  # interleaved, so a change of load hits both alike
            for name, read in readers.items():
                t0 = time.process_time()
                read()
                times[name].append(time.process_time() - t0)
        for name, ts in times.items():
            print(
                f"{label} {name:9}  min {min(ts) * 1e3:6.2f} ms  "
                f"median {statistics.median(ts) * 1e3:6.2f} ms"
            )


if __name__ == "__main__":
    main()
