"""Fuzz properties of the front end and the tar reader (issue 11 item 17), shared by the
bounded tests (tests/test_fuzz.py) and the long run (bench/fuzz.py).

Each ``check_*`` takes generated input and asserts the property: the code under test either
succeeds or raises an ``LbuildError`` (the CLI's one line, exit 1 or 2), never another
exception (an internal error, a traceback), and extracting an archive never writes outside
the root filesystem it is given.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path

from hypothesis import strategies as st

from cache.errors import LbuildError

# --- the front end -------------------------------------------------------------------------

KEYWORDS = [
    "FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "USER", "LABEL", "EXPOSE", "VOLUME",
    "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD", "MAINTAINER",
]  # fmt: skip
PIECES = [
    " ", "  ", "\t", "\\", "\\\n", "\n", "$", "${", "}", "${A:-x}", "${A:+y}", "${A?no}",
    "$A", "${", "'", '"', "[", "]", '["a", "b"]', "[\"", ",", "=", "A=1", "--from=", "--chown=",
    "--chmod=", "--link", "--mount=type=cache,target=/c", "--mount=type=bind", "--network=none",
    "--platform=$BUILDPLATFORM", "AS", "as", "scratch", "base", "/", ".", "..", "*", "?", "**",
    "<<EOF", "EOF", "<<-X", "# escape=`", "# syntax=x", "#", "`", "é", "\x00", "\r", "\u2028",
    "0", "-1", "99999999999999999999", "a b", "/app", "src", "dst/", "${ARG}", "\\$x",
]  # fmt: skip

word = st.sampled_from(PIECES) | st.text(max_size=6)
line = st.builds(
    lambda kw, parts: kw + " " + "".join(parts),
    st.sampled_from(KEYWORDS) | st.text(max_size=5),
    st.lists(word, max_size=8),
)
dockerfiles = st.builds(
    lambda head, lines: "\n".join([head, *lines]) + "\n",
    st.sampled_from(["FROM scratch", "FROM scratch AS base", "ARG B=scratch\nFROM $B", ""]),
    st.lists(line, max_size=10),
)
build_args = st.dictionaries(
    st.sampled_from(["A", "B", "ARG", "BUILDPLATFORM", "TARGETOS", "x y", ""])
    | st.text(max_size=4),
    st.text(max_size=8),
    max_size=4,
)
ignore_files = st.builds(
    "\n".join,
    st.lists(
        st.sampled_from(["*", "**", "!", "!a", "a/**/b", "[", "[a-", "[]", "\\", "..", "/", "#x",
                         "a?", "**/*.txt", " ", "![^a]"]) | st.text(max_size=8),
        max_size=8,
    ),
)  # fmt: skip
paths = st.sampled_from(["a", "a/b", "dir/x.txt", ".git/y", "b/a", "x y", "é", "..a"]) | st.text(
    min_size=1, max_size=10
)


def check_dockerfile(text: str, args: dict[str, str]) -> None:
    """Parse and resolve every stage (ARG/ENV expansion with build args): only LbuildError."""
    from builder.frontend.dockerfile import parse
    from builder.frontend.resolve import global_args, resolve_base, resolve_stage

    try:
        df = parse(text, "Dockerfile")
        global_args(df, args)
        for stage in df.stages:
            resolve_base(df, stage, args)
            resolve_stage(df, stage, [], args)
    except LbuildError:
        pass


def check_ignore(text: str, candidates: list[str]) -> None:
    """Compile a .dockerignore and ask it about paths: only LbuildError (or its syntax error
    type, which the loader reports as one)."""
    from builder.frontend.dockerignore import PatternSyntaxError, parse_dockerignore

    try:
        rules = parse_dockerignore(text, source=".dockerignore")
        for p in candidates:
            rules.excluded(p)
    except (LbuildError, PatternSyntaxError):
        pass


# --- the tar reader ------------------------------------------------------------------------


def _header(name: bytes, size: int, typeflag: bytes, link: bytes = b"", mode: int = 0o644) -> bytes:
    h = bytearray(512)
    h[0:100] = name[:100].ljust(100, b"\0")
    h[100:108] = b"%07o\0" % (mode & 0o7777777)
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = (
        (b"%011o\0" % size)
        if 0 <= size < 8**11
        else b"\x80" + size.to_bytes(11, "big", signed=True)[-11:]
    )
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157:257] = link[:100].ljust(100, b"\0")
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % (sum(h) & 0o777777)
    return bytes(h)


def _pax(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec)
        while len(b"%d" % n) + len(rec) != n:
            n = len(b"%d" % n) + len(rec)
        body += b"%d" % n + rec
    return _header(b"././@PaxHeader", len(body), b"x") + body + b"\0" * (-len(body) % 512)


NAMES = [b"a", b"dir/", b"dir/f", b"../escape", b"/abs", b"a/../../b", b"link", b"link/x",
         b".wh.a", b"dir/.wh..wh..opq", b"", b".", b"./", b"\xff\xfe", b"a" * 120, b"x//y"]  # fmt: skip
member = st.tuples(
    st.sampled_from(NAMES) | st.binary(max_size=12),
    st.integers(-5, 3000) | st.sampled_from([0, 512, 1 << 40, -(1 << 40)]),
    st.sampled_from([b"0", b"5", b"2", b"1", b"3", b"6", b"7", b"L", b"K", b"g", b"S", b"\0", b"Z"]),
    st.sampled_from([b"", b"a", b"/etc/passwd", b"../../x", b"dir", b"link/x"]),
    st.sampled_from([0o644, 0o755, 0o4755, 0o7777, 0o17777777]),
    st.none() | st.dictionaries(
        st.sampled_from([b"path", b"linkpath", b"size", b"uid", b"mtime", b"SCHILY.xattr.user.a",
                         b"GNU.sparse.map", b"hdrcharset", b""]) | st.binary(max_size=6),
        st.sampled_from([b"../x", b"/abs", b"-1", b"1e9", b"99999999999999999999", b"\xff", b""])
        | st.binary(max_size=8),
        max_size=3,
    ),
    st.binary(max_size=64),
)  # fmt: skip
archives = st.builds(
    lambda members, tail, cut: _archive(members, tail)[: cut if cut is not None else None],
    st.lists(member, max_size=6),
    st.sampled_from([b"\0" * 1024, b"", b"\0" * 512, b"garbage"]),
    st.none() | st.integers(0, 6000),
)


def _archive(
    members: list[tuple[bytes, int, bytes, bytes, int, dict[bytes, bytes] | None, bytes]],
    tail: bytes,
) -> bytes:
    out = b""
    for name, size, typeflag, link, mode, pax, data in members:
        if pax is not None:
            out += _pax(pax)
        out += _header(name, size, typeflag, link, mode)
        body = data[: max(size, 0)] if size < 4096 else data
        out += body + b"\0" * (-len(body) % 512)
    return out + tail


def check_archive(data: bytes, root: Path) -> None:
    """Read an archive as a layer (what ADD and an image import do), then, when it reads,
    extract it with the layer applier into ``root/rootfs``; read it as ``lbuild diff`` does
    too: only LbuildError, and nothing ever appears in ``root`` outside ``rootfs``."""
    from builder.compare.tarscan import scan
    from builder.plan.archive import archive_items
    from cache.layers.apply import apply_layer
    from cache.layers.tar import import_layer
    from cache.store.blobs import BlobStore

    store = BlobStore(root / "store")
    rootfs = root / "rootfs"
    rootfs.mkdir()
    before = _outside(root)
    with contextlib.suppress(LbuildError):
        for _ in scan(io.BytesIO(data)):
            pass
    for blob in (data, _gz(data)):
        try:
            info = import_layer(store, io.BytesIO(blob), "auto")
        except LbuildError:
            continue
        with contextlib.suppress(LbuildError):
            archive_items(info.toc, info.diff_id, "fuzz.tar")
        try:
            with store.open(info.diff_id) as f:
                apply_layer(f, rootfs, expected=info.diff_id)
        except LbuildError:
            pass
    assert _outside(root) == before, "an archive wrote outside the root filesystem"


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, 1, mtime=0)


def _outside(root: Path) -> set[str]:
    """Every path under ``root`` except inside rootfs/ and the store."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("rootfs", "store"):
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            seen.add(os.path.join(rel, n))
    return seen


def well_formed_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A valid tar (tarfile's PAX writer) to mutate."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return bio.getvalue()


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


__all__ = [
    "archives", "build_args", "check_archive", "check_dockerfile", "check_ignore",
    "dockerfiles", "ignore_files", "mutate", "paths", "well_formed_tar",
]  # fmt: skip
