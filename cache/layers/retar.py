"""An edited layer's tar written from its previous version's (issue 16 item 2).

After a one-file edit a ``COPY src/`` writes the same members as last time but one; writing
its tar opened, read and hashed every unchanged file again and formatted every header in
Python (~50 ms for the bench's 2,208 members, on the critical path of an edit below a RUN).
A layer's bytes are a function of its entries alone (``cache.layers.tar``: deterministic
headers, fixed order), so a member whose entry is unchanged has the bytes it had in the
previous tar.  Each layer of :data:`MIN_MEMBERS` or more that a COPY, ADD or WORKDIR writes
is recorded under its *shape* (the writer's version and every member's path and type, in
order) with its diff_id and TOC blob (``remember``); a new layer of the same shape
(``rewrite``) copies each run of unchanged members from that tar (``pread``, at C speed) and
writes only the changed members, from their sources as ``write_layer`` does.  "Unchanged" is
the TOC row without the offset: mode, owner, size, content blake3 (the plan's, known before
anything is read), link, time, device numbers, xattrs.

Nothing unverified goes into the new layer.  The TOC blob is hashed against its name; every
member's offset in the previous tar is checked against the layout the writer gives it (a
header's length follows from its entry), and the tar's size against the end of the last
member; the previous tar is hashed whole as its runs are copied (the bytes of the members
that changed are read for that too) and must hash to its diff_id, or the new tar is dropped
and the layer written from its sources (a previous tar that does not match its name is
removed from the store).  The new tar is hashed as it is written, as every blob is.  An
unchanged member's content is the plan's (its blake3 is in the step's key), never re-read
from the context: a file edited after planning cannot slip into the layer.

The records live in ``Home.tar_shapes``, one small file per shape (``"<diff_id> <toc
digest>"``, last writer wins); a record whose blobs are gone is ignored, and ``cache prune``
removes those (``sweep``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cache.errors import CorruptBlob, LbuildError
from cache.layers.tarfmt import _BLOCK, _ZERO_BLOCK, TAR_WRITER_VERSION
from cache.layers.toc import read_toc_blob, row_entry, toc_rows
from cache.store.contract import ContentStore
from cache.types import Digest, Entry, LayerInfo, sha256_digest

MIN_MEMBERS = 64
"""Layers with fewer members are written whole and not recorded."""
_READ = 1 << 20

# (start, end, -1): a run of unchanged members, bytes [start, end) of the previous tar;
# (start, end, i): member i written anew, its previous version at [start, end) (hashed only)
_Piece = tuple[int, int, int]


class _Stale(Exception):
    """The previous tar is not what its record and TOC say: write the layer anew."""


def shape_of(entries: Sequence[Entry]) -> str:
    """The shape of a layer's members (entries in tar order)."""
    h = hashlib.sha256(f"tar-writer-{TAR_WRITER_VERSION}\n".encode())
    h.update("\0".join(f"{e.path}\0{e.type}" for e in entries).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def remember(records: Path, toc: Sequence[Entry], diff_id: Digest, toc_digest: Digest) -> None:
    """Record layer ``diff_id`` (TOC blob ``toc_digest``) as the one of its shape.  A record
    is only a shortcut: one that cannot be written is not an error."""
    if len(toc) < MIN_MEMBERS:
        return
    from cache.home import write_record

    with contextlib.suppress(OSError):
        write_record(records / shape_of(toc), f"{diff_id} {toc_digest}")


def sweep(records: Path, has: Callable[[Digest], bool]) -> int:
    """Remove the records whose tar or TOC blob is gone (``cache prune``); how many."""
    removed = 0
    try:
        names = os.listdir(records)
    except OSError:
        return 0
    for name in names:
        path = records / name
        try:
            parts = path.read_text().split()
            keep = len(parts) == 2 and all(has(Digest(p)) for p in parts)
        except (OSError, UnicodeDecodeError, LbuildError):
            keep = False
        if not keep:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed


def _previous(store: ContentStore, records: Path, shape: str) -> tuple[Digest, list[Any]] | None:
    """The recorded layer of ``shape``: its diff_id and its TOC rows (``toc.dump_toc``'s),
    when both blobs are in the store and the TOC blob matches its name."""
    try:
        parts = (records / shape).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(parts) != 2:
        return None
    diff_id, toc_digest = Digest(parts[0]), Digest(parts[1])
    try:
        if not store.has(diff_id):
            return None
    except LbuildError:  # a malformed digest
        return None
    data = read_toc_blob(store, toc_digest)
    if data is None:
        return None
    rows = toc_rows(data)
    return (diff_id, rows) if rows is not None else None


def _same(e: Entry, row: Any) -> bool:
    """Whether TOC row ``row`` describes entry ``e`` (the offset aside); a regular file
    whose digest the plan does not know is never the same."""
    if type(row) is not list or len(row) not in (10, 13):
        return False
    if e.type == "file" and not e.digest:
        return False
    mode, uid, gid, size, mtime = row[2], row[3], row[4], row[5], row[8]
    if (
        row[6] != e.digest or mode != e.mode or size != e.size or mtime != e.mtime
        or uid != e.uid or gid != e.gid or row[7] != e.link
        or type(mode) is not int or type(size) is not int or type(mtime) is not int
        or type(uid) is not int or type(gid) is not int
    ):  # fmt: skip
        return False
    if len(row) == 10:
        return not (e.devmajor or e.devminor or e.xattrs)
    try:
        xattrs = tuple((n, base64.b64decode(v, validate=True)) for n, v in row[12])
    except (TypeError, ValueError):
        return False
    return row[10] == e.devmajor and row[11] == e.devminor and xattrs == e.xattrs


def _old_entry(row: list[Any]) -> Entry:
    """The entry a TOC row describes (only for the header length of a changed member)."""
    entry = row_entry(row)
    if entry is None:
        raise _Stale("a damaged TOC row")
    return entry


def _plan_pieces(
    planned: Sequence[tuple[str, Entry]],
    rows: list[Any],
    header_len: Callable[[str, Entry], int],
) -> tuple[list[_Piece], list[int], int] | None:
    """Runs of unchanged members (their byte ranges in the previous tar) and the members
    written anew, each member's header length in the new tar, and the previous tar's
    expected size; None when nothing would be copied."""
    pieces: list[_Piece] = []
    lengths: list[int] = []
    pos = 0
    copied = False
    for i, (name, e) in enumerate(planned):
        row = rows[i]
        if not isinstance(row, list) or len(row) < 10 or row[0] != e.path or row[1] != e.type:
            raise _Stale("another shape")
        same = _same(e, row)
        hl = header_len(name, e)
        old_hl = hl if same else header_len(name, _old_entry(row))
        lengths.append(hl)
        if e.type == "file":
            offset, size = row[9], row[5]
            if type(offset) is not int or type(size) is not int or offset != pos + old_hl:
                raise _Stale("a member is not where the writer puts it")
            end = offset + size + (-size % _BLOCK)
        else:
            end = pos + old_hl
        if same:
            copied = copied or e.type == "file"
            if pieces and pieces[-1][2] < 0 and pieces[-1][1] == pos:
                pieces[-1] = (pieces[-1][0], end, -1)
            else:
                pieces.append((pos, end, -1))
        else:
            pieces.append((pos, end, i))
        pos = end
    return (pieces, lengths, pos + 2 * _BLOCK) if copied else None


def rewrite(
    planned: Sequence[tuple[str, Entry]],
    store: ContentStore,
    records: Path,
    headers: Callable[[str, Entry], bytes],
    header_len: Callable[[str, Entry], int],
    write_member: Callable[[Entry, bytes, Any], str],
) -> LayerInfo | None:
    """The layer of ``planned`` (``tar._plan``'s members) written from the previous tar of
    its shape; None when there is none to use (the caller writes it from its sources).

    ``headers(name, entry)`` gives a member's header bytes, ``header_len`` their length
    and ``write_member(entry, header, writer)`` writes a regular file's member from its
    source, returning its blake3 (``tar._headers``, ``tar._header_len`` and
    ``tar._copy_content``)."""
    entries = [e for _, e in planned]
    prev = _previous(store, records, shape_of(entries))
    if prev is None:
        return None
    old_id, rows = prev
    if len(rows) != len(planned):
        return None
    try:
        plan = _plan_pieces(planned, rows, header_len)
        if plan is None:
            return None
        pieces, lengths, old_size = plan
        with store.open(old_id) as old:
            if os.fstat(old.fileno()).st_size != old_size:
                return None
            job = _Rewrite(planned, pieces, lengths, old.fileno(), headers, write_member)
            return job.write(store, old_id, old_size)
    except _Stale:
        return None


class _Rewrite:
    """One layer written from the previous tar of its shape (``rewrite``'s second half)."""

    def __init__(
        self,
        planned: Sequence[tuple[str, Entry]],
        pieces: list[_Piece],
        lengths: list[int],
        fd: int,
        headers: Callable[[str, Entry], bytes],
        write_member: Callable[[Entry, bytes, Any], str],
    ) -> None:
        self.planned, self.pieces, self.lengths, self.fd = planned, pieces, lengths, fd
        self.headers, self.write_member = headers, write_member
        # The previous tar is hashed on a thread of its own (hashlib lets go of the GIL)
        # while this one writes, and so hashes, the new tar: both hashes in one pass's time.
        self.old_hash = hashlib.sha256()
        self.chunks: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def write(self, store: ContentStore, old_id: Digest, old_size: int) -> LayerInfo:
        checker = threading.Thread(target=self._check, name="retar-check", daemon=True)
        checker.start()
        try:
            with store.ingest() as w:
                digests = self._members(w, old_size)
                self.chunks.put(None)
                checker.join()
                actual = sha256_digest(self.old_hash.hexdigest())
                if actual != old_id:
                    with contextlib.suppress(CorruptBlob):
                        store.vouch(old_id, actual)  # removes it
                    raise _Stale("the previous tar does not match its diff_id")
        finally:
            self.chunks.put(None)
            checker.join()
        store.vouch(old_id, old_id)
        return LayerInfo(diff_id=w.digest, size=w.size, toc=self._toc(digests))

    def _check(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.old_hash.update(chunk)

    def _old_bytes(self, start: int, end: int, out: Any | None) -> None:
        """The previous tar's bytes ``[start, end)``: hashed, and copied to ``out``."""
        while start < end:
            chunk = os.pread(self.fd, min(_READ, end - start), start)
            if not chunk:
                raise _Stale("the previous tar ends early")
            self.chunks.put(chunk)
            if out is not None:
                out.write(chunk)
            start += len(chunk)

    def _members(self, w: Any, old_size: int) -> dict[int, str]:
        """Every member into ``w``: runs of unchanged ones copied, the others written anew
        (the previous version of each hashed, not copied); the written files' blake3."""
        digests: dict[int, str] = {}
        end = 0
        for start, end, i in self.pieces:
            self._old_bytes(start, end, w if i < 0 else None)
            if i < 0:
                continue
            name, e = self.planned[i]
            header = self.headers(name, e)
            if e.type == "file":
                digests[i] = self.write_member(e, header, w)
            else:
                w.write(header)
        self._old_bytes(end, old_size, None)  # its two zero blocks
        w.write(_ZERO_BLOCK * 2)
        return digests

    def _toc(self, digests: dict[int, str]) -> tuple[Entry, ...]:
        """The new tar's TOC, as ``write_layer`` gives it (files with their new offsets)."""
        toc: list[Entry] = []
        pos = 0
        for i, (_name, e) in enumerate(self.planned):
            hl = self.lengths[i]
            if e.type != "file":
                toc.append(e)
                pos += hl
                continue
            offset = pos + hl
            toc.append(
                Entry(
                    path=e.path, type=e.type, mode=e.mode, uid=e.uid, gid=e.gid, size=e.size,
                    digest=digests.get(i, e.digest), link=e.link, mtime=e.mtime,
                    devmajor=e.devmajor, devminor=e.devminor, xattrs=e.xattrs, offset=offset,
                    source=None,
                )
            )  # fmt: skip
            pos = offset + e.size + (-e.size % _BLOCK)
        return tuple(toc)
