"""Long fuzzing run of the front end and the tar reader (issue 11 item 17): the properties of
tests/fuzz_cases.py (never an internal error, never a write outside the root filesystem) with
many more examples than the bounded tests/test_fuzz.py.

    python3 bench/fuzz.py [--examples 5000] [--only dockerfile|ignore|archive|mutated]

Exit status 0 when every property held; hypothesis prints the shrunk failing input otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fuzz_cases import (  # noqa: E402
    archives,
    build_args,
    check_archive,
    check_dockerfile,
    check_ignore,
    dockerfiles,
    ignore_files,
    mutate,
    paths,
    well_formed_tar,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def runs(n: int) -> dict[str, object]:
    cfg = settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))

    @cfg
    @given(dockerfiles | st.text(max_size=400), build_args)
    def dockerfile(text: str, args: dict[str, str]) -> None:
        check_dockerfile(text, args)

    @cfg
    @given(ignore_files, st.lists(paths, max_size=8))
    def ignore(text: str, candidates: list[str]) -> None:
        check_ignore(text, candidates)

    @cfg
    @given(archives)
    def archive(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            check_archive(data, Path(d))

    @cfg
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "d/b", "../x", "/abs", "é" * 60, "l" * 150, "d/../../y"]),
                st.binary(max_size=200),
            ),
            min_size=1,
            max_size=5,
        ),
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=12),
    )
    def mutated(members: list[tuple[str, bytes]], flips: list[tuple[int, int]]) -> None:
        with tempfile.TemporaryDirectory() as d:
            check_archive(mutate(well_formed_tar(members), flips), Path(d))

    return {"dockerfile": dockerfile, "ignore": ignore, "archive": archive, "mutated": mutated}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000)
    ap.add_argument("--only", choices=["dockerfile", "ignore", "archive", "mutated"])
    args = ap.parse_args()
    failed = 0
    for name, fn in runs(args.examples).items():
        if args.only and name != args.only:
            continue
        t0 = time.monotonic()
        try:
            fn()  # type: ignore[operator]
            print(f"{name}: {args.examples} examples, no failure ({time.monotonic() - t0:.0f}s)")
        except Exception as e:  # hypothesis re-raises the shrunk failure
            failed += 1
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
