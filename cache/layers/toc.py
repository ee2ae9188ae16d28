"""A layer's table of contents as a small JSON blob, so it need not be read back from the tar.

A non-link COPY or a RUN sees the merged view of the layers below it, which needs each
layer's TOC (every entry with its metadata, content blake3 and data offset).  Reading a TOC
from the tar means reading and hashing every file in it: 40 MiB for the benchmark's two
asset layers.  When a step writes a layer it already has the TOC in hand, so it stores it
in the content store as a *TOC blob* and names it in the step record (``toc_digest``); a
later build that hits that record loads the blob instead.

The blob is content-addressed like any other (``cache verify`` re-hashes it; a record's
TOC blob is referenced, so garbage collection keeps it).  Its format is versioned: a blob
of another version is ignored and the tar is read instead.

A layer no step wrote (a base image's) has no step record to name its TOC blob: its import
keeps the TOC it made, else the first build that needs it reads the tar (every file hashed)
and keeps that, as a blob named by a record under the home's ``tocs/``
(``remember_layer_toc``; ``diff_id toc_digest``, as a tar shape's record), where later builds
find it (``layer_toc``).  No step record references such a blob, so a prune may remove it
(and then the record: ``retar.sweep``); its TOC is then read from the tar again.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, get_args

from cache.types import Digest, Entry, EntryType, LayerInfo, sha256_digest

if TYPE_CHECKING:
    from cache.store.blobs import BlobStore
    from cache.store.contract import ContentStore

TOC_FORMAT = 1


_DUMPED: list[tuple[Sequence[Entry], bytes]] = []
"""The last TOCs dumped, with their bytes, by identity: a COPY stores its layer's TOC blob
and the RUN above it makes that layer's directory, which keeps the same bytes beside it
(2,208 entries: ~3 ms each time, on the RUN's critical path)."""
_DUMPED_MAX = 8
_dumped_lock = threading.Lock()


def dump_toc(toc: Sequence[Entry]) -> bytes:
    """The canonical bytes of a TOC (``source`` is not part of it).  The same sequence
    object as one of the last few dumped (a tuple: entries never change) gets the bytes it
    got then."""
    with _dumped_lock:
        for seen, data in _DUMPED:
            if seen is toc:
                return data
    data = _dump(toc)
    if isinstance(toc, tuple):
        with _dumped_lock:
            _DUMPED.append((toc, data))
            del _DUMPED[:-_DUMPED_MAX]
    return data


def _dump(toc: Sequence[Entry]) -> bytes:
    rows: list[list[Any]] = []
    for e in toc:
        row: list[Any] = [
            e.path, e.type, e.mode, e.uid, e.gid, e.size, e.digest, e.link, e.mtime, e.offset,
        ]  # fmt: skip
        if e.devmajor or e.devminor or e.xattrs:
            row += [
                e.devmajor,
                e.devminor,
                [[n, base64.b64encode(v).decode("ascii")] for n, v in e.xattrs],
            ]
        rows.append(row)
    return json.dumps({"toc": TOC_FORMAT, "entries": rows}, separators=(",", ":")).encode()


def load_toc(data: bytes) -> tuple[Entry, ...] | None:
    """The TOC in ``data``, or None when it is not a TOC blob of this format."""
    rows = toc_rows(data)
    if rows is None:
        return None
    try:
        return _entries(rows)
    except (KeyError, TypeError, ValueError, IndexError):
        return None  # damaged: the caller reads the tar instead


def _record_path(store: BlobStore, diff_id: Digest) -> Path | None:
    from cache.home import Home
    from cache.types import digest_hex

    try:
        return Home(store.root).layer_tocs / digest_hex(diff_id)
    except ValueError:
        return None


def read_toc_blob(store: ContentStore, digest: Digest) -> bytes | None:
    """The bytes of TOC blob ``digest`` when this store has it and they hash to its name
    (a record names it: cheap to check, one small blob); None otherwise (a malformed
    digest, a blob pruned or lost, other bytes): the caller reads the tar instead."""
    from cache.errors import LbuildError

    try:
        if not store.has(digest):
            return None
        data = store.read(digest)
    except (LbuildError, OSError):
        return None
    return data if sha256_digest(hashlib.sha256(data).hexdigest()) == digest else None


def layer_toc(store: BlobStore, diff_id: Digest) -> tuple[Entry, ...] | None:
    """The TOC ``remember_layer_toc`` kept for layer ``diff_id``, or None when there is none
    to use (then the tar is read)."""
    path = _record_path(store, diff_id)
    if path is None:
        return None
    try:
        parts = path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(parts) != 2 or parts[0] != diff_id:
        return None
    data = read_toc_blob(store, Digest(parts[1]))
    return load_toc(data) if data is not None else None


def remember_layer_toc(store: BlobStore, diff_id: Digest, toc: Sequence[Entry]) -> Digest:
    """Keep ``toc`` (the TOC of layer ``diff_id``, read from its tar or made as it was
    imported) as a TOC blob that ``layer_toc`` finds; its digest."""
    from cache.home import write_record

    digest = store.put(dump_toc(toc))
    path = _record_path(store, diff_id)
    if path is not None:
        write_record(path, f"{diff_id} {digest}")  # the last writer wins: the same TOC
    return digest


def remember_layer_tocs(store: BlobStore, layers: Iterable[LayerInfo]) -> None:
    """``remember_layer_toc`` for each layer imported with its TOC (``import_layer``'s), as
    far as the store can be written: the TOC is read from the tar when it is not kept."""
    for info in layers:
        if info.toc:
            with contextlib.suppress(OSError):
                remember_layer_toc(store, info.diff_id, info.toc)


def toc_rows(data: bytes) -> list[Any] | None:
    """The rows of a TOC blob of this format as ``dump_toc`` wrote them, not yet checked
    (``row_entry`` checks one); None when ``data`` is not one.  For callers that compare
    rows and turn only a few of them into entries."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("toc") != TOC_FORMAT:
        return None
    rows = doc.get("entries")
    return rows if isinstance(rows, list) else None


def row_entry(row: Any) -> Entry | None:
    """One row of ``toc_rows`` as an entry, checked as ``load_toc`` checks it; None when it
    is damaged."""
    try:
        (entry,) = _entries([row])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    return entry


_KINDS = frozenset(get_args(EntryType))


def inside_layer(path: str) -> bool:
    """Whether ``path`` names something inside the layer: relative, no ``..``, not empty (a
    member's path below the root, a hardlink's target; as the tar reader cleans them)."""
    return bool(path) and not path.startswith("/") and ".." not in path.split("/")


def _entries(rows: list[Any]) -> tuple[Entry, ...]:
    """The rows as entries; ValueError for a row that no layer lbuild reads could have (a
    TOC blob named by a shared cache's record is input like any other: a damaged one is the
    tar read instead, never an error later in the file system calls)."""
    from cache.layers.tarread import MAX_ID, MAX_MTIME_S

    out: list[Entry] = []
    for row in rows:
        path, kind, mode, uid, gid, size, digest, link, mtime, offset = row[:10]
        devmajor = devminor = 0
        xattrs: tuple[tuple[str, bytes], ...] = ()
        if len(row) > 10:
            devmajor, devminor = row[10], row[11]
            xattrs = tuple((n, base64.b64decode(v)) for n, v in row[12])
        # every test spelled out (a chain's TOCs are thousands of rows, read on the
        # critical path of an edit): owner_in_range, mtime_in_range, no "..", no NUL
        if (
            kind not in _KINDS
            or type(mode) is not int
            or type(uid) is not int
            or type(gid) is not int
            or type(size) is not int
            or type(mtime) is not int
            or type(offset) is not int
            or type(devmajor) is not int
            or type(devminor) is not int
            or not isinstance(path, str)
            or not isinstance(digest, str)
            or not isinstance(link, str)
            or "\0" in path
            or "\0" in link
            or (".." in path and ".." in path.split("/"))
            or path.startswith("/")
            or not 0 <= uid <= MAX_ID
            or not 0 <= gid <= MAX_ID
            or not -MAX_MTIME_S <= mtime <= MAX_MTIME_S
            or size < 0
            or not 0 <= mode <= 0o7777
            or (xattrs and any(not isinstance(n, str) for n, _ in xattrs))
            or (kind == "hardlink" and not inside_layer(link))
        ):
            raise ValueError(f"not a TOC row: {row!r}"[:200])
        out.append(
            Entry(
                path=path,
                type=cast(EntryType, kind),
                mode=mode,
                uid=uid,
                gid=gid,
                size=size,
                digest=digest,
                link=link,
                mtime=mtime,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=xattrs,
                offset=offset,
            )
        )
    return tuple(out)
