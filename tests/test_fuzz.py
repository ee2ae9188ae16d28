"""Bounded fuzzing of the front end and the tar reader (issue 11 item 17): random and mutated
Dockerfiles, .dockerignore files, build args, and malformed archives (bad headers, PAX records,
sizes, names) never give an internal error, and an archive never writes outside the root
filesystem.  ``bench/fuzz.py`` runs the same properties for longer."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fuzz_cases import (
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None
)


@FAST
@given(dockerfiles, build_args)
def test_fuzz_dockerfiles(text: str, args: dict[str, str]) -> None:
    check_dockerfile(text, args)


@FAST
@given(st.text(max_size=300), build_args)
def test_fuzz_arbitrary_text_as_a_dockerfile(text: str, args: dict[str, str]) -> None:
    check_dockerfile(text, args)


@FAST
@given(ignore_files, st.lists(paths, max_size=6))
def test_fuzz_dockerignore(text: str, candidates: list[str]) -> None:
    check_ignore(text, candidates)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(archives)
def test_fuzz_malformed_archives(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_archive(data, Path(d))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "d/b", "../x", "é" * 60, "l" * 150]), st.binary(max_size=40)
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_fuzz_mutated_archives(
    members: list[tuple[str, bytes]], flips: list[tuple[int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_archive(mutate(well_formed_tar(members), flips), Path(d))


FOUND = {
    # a GNU long-name header claiming 1 TiB: was read into memory (MemoryError)
    "huge long name": [(b"a", 1 << 40, b"L", b"", 0o644, None, b"")],
    # a symlink with an empty target: symlink(2) says ENOENT (was an OSError line)
    "empty symlink": [(b"a", 0, b"2", b"", 0o644, None, b"")],
    # a PAX record tarfile parses with int() (GNU.sparse.map) before a member: ValueError
    "sparse map": [
        (b"a", 0, b"0", b"", 0o644, None, b""),
        (b"a", 0, b"L", b"", 0o644, {b"GNU.sparse.map": b"../x"}, b""),
        (b"a", 0, b"0", b"", 0o644, {}, b""),
    ],
    # the same in the archive's first header: tarfile.open itself raised the ValueError
    "sparse map first": [
        (b"a", 0, b"L", b"", 0o644, None, b""),
        (b"a", 0, b"K", b"", 0o644, None, b""),
        (b"a", 0, b"L", b"", 0o644, {b"GNU.sparse.map": b"../x"}, b""),
        (b"a", 0, b"0", b"", 0o644, {}, b""),
    ],
    # a user.* xattr on a device node: setxattr says EPERM (was a PermissionError line)
    # PAX numbers lbuild diff's reader parsed as floats: nan/inf were a ValueError/OverflowError
    "nan uid": [(b"a", 0, b"0", b"", 0o644, {b"uid": b"nan"}, b"")],
    "inf uid": [(b"a", 0, b"0", b"", 0o644, {b"uid": b"inf"}, b"")],
    "xattr on a device": [(b"dev", 0, b"3", b"", 0o644, {b"SCHILY.xattr.user.a": b"x"}, b"")],
    # a NUL byte inside a PAX path (a byte flip in its record): os.lstat's ValueError
    "nul in a pax path": [(b"a", 0, b"0", b"", 0o644, {b"path": b"d/\x00b"}, b"")],
    "nul in a pax linkpath": [(b"l", 0, b"2", b"", 0o644, {b"linkpath": b"x\x00y"}, b"")],
    # PAX numbers beyond what chown and utime take: OverflowError
    "huge uid": [(b"a", 0, b"0", b"", 0o644, {b"uid": b"99999999999999999999"}, b"")],
    "huge mtime": [(b"a", 0, b"0", b"", 0o644, {b"mtime": b"99999999999999999999"}, b"")],
    "negative gid": [(b"a", 0, b"0", b"", 0o644, {b"gid": b"-5"}, b"")],
}


def test_fuzz_findings_stay_fixed(tmp_path: Path) -> None:
    """What bench/fuzz.py found, as fixed inputs."""
    from fuzz_cases import _archive

    for n, members in enumerate(FOUND.values()):
        root = tmp_path / str(n)
        root.mkdir()
        check_archive(_archive(members, b"\0" * 1024), root)
    check_dockerfile("FROM scratch\nHEALTHCHECK \U00020000\n", {})  # UnicodeDecodeError


def test_a_corrupt_deflate_stream_is_bad_input_everywhere(tmp_path: Path) -> None:
    """ISA-L says IsalError (not an OSError) for a gzip stream with an invalid deflate block:
    importing the layer (ADD, a pulled image) and reading it for ``lbuild diff`` both say
    InvalidInput, not a traceback (found by the fuzz test)."""
    import io

    import pytest

    from builder.compare.source import Layer, iter_members
    from cache.errors import InvalidInput
    from cache.layers.tar import import_layer
    from cache.store.blobs import BlobStore

    bad = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x07" + b"\x00" * 600
    with pytest.raises(InvalidInput, match="not a valid gzip stream"):
        import_layer(BlobStore(tmp_path / "store"), io.BytesIO(bad), "auto")
    layer = Layer(index=0, media_type="application/vnd.oci.image.layer.v1.tar+gzip",
                  digest="", size=len(bad), diff_id="", opener=lambda: io.BytesIO(bad))  # fmt: skip
    with pytest.raises(InvalidInput, match="cannot read the layer tar"):
        list(iter_members(layer))
    root = tmp_path / "fuzz"
    root.mkdir()
    check_archive(bad, root)
