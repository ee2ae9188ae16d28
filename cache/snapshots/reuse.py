"""An edited layer's directory made from its previous version's, in place (issue 16 item 1).

An edit below a RUN changes one layer, usually one file of it; the RUN needs that layer's
directory, and unpacking all of it (2,208 entries, 6.5 MB for the bench's ``COPY src/``) was
most of the RUN's wait.  When the overlay snapshotter has the directory of a layer with the
same *shape* (the same paths, each of the same type, on the same parent directories: the
previous version of the same COPY after a content edit), it takes that directory over
instead: moves it to the new layer's work directory, rewrites what differs (a regular
file's bytes, checked against the TOC's blake3 as they are written, and metadata of files
and directories), and commits it under the new layer's name.  The old name is then gone,
as if the GC had removed it: a chain that needs it makes it again (``ensure_chain``).

The result is a full directory of the new layer, the same tree unpacking it makes: the
entries that did not change are the previous version's, checked when that directory was
made and never written since (``cache.snapshots.verify``); a file is rewritten in place
(``O_TRUNC``), which changes no directory's time or link count; only regular files and
directories may differ, anything else (a symlink's target, a device, a whiteout, a hard
link anywhere in the layer, a path added or removed) means unpacking the layer whole.

A directory is never taken while a snapshot mounts it (a shared lock per layer directory,
held by every active snapshot of a chain that holds it) nor while this build's own chains
hold it (``pinned``); another build can still take one between its ``ensure_chain`` and
``prepare``, which then says NotFound and the caller makes the chain again without reuse.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cache.errors import InvalidInput
from cache.layers.apply import _FORBIDDEN_XATTR_PREFIXES
from cache.layers.toc import inside_layer
from cache.layers.tocapply import write_file
from cache.types import Entry

PATCH_MIN_ENTRIES = 64
"""Layers with fewer entries are unpacked whole (taking a directory over would save little)."""
TOC_FILE = "toc.json"
"""Beside a layer directory's ``fs``: the TOC it was made from, for a later edit to compare."""


def shape_of(toc: Sequence[Entry], parents_json: str) -> str:
    """What two layers must share for one's directory to become the other's: the parent
    directories' metadata and every entry's path and type, in order."""
    h = hashlib.sha256(parents_json.encode())
    h.update("\0".join(f"{e.path}\0{e.type}" for e in toc).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def changes_between(old_toc: bytes, new: Sequence[Entry], new_toc: bytes) -> list[tuple[Entry, Entry]] | None:
    """The (old, new) entries that differ between two layers given as their TOC files
    (``toc.dump_toc``'s bytes; ``new`` is the second's entries), or None when the first's
    directory cannot become the second's in place (see the module docstring).  Rows are
    compared as they are (the data offset aside) and only the rows that differ become
    entries: reading a 2,208-entry TOC into entries took ~10 ms of the RUN's wait."""
    from cache.layers.toc import row_entry, toc_rows

    old_rows, new_rows = toc_rows(old_toc), toc_rows(new_toc)
    if old_rows is None or new_rows is None or not len(old_rows) == len(new_rows) == len(new):
        return None
    out: list[tuple[Entry, Entry]] = []
    for i, (o, n) in enumerate(zip(old_rows, new_rows, strict=True)):
        if not isinstance(o, list) or not isinstance(n, list) or len(o) < 10 or len(n) < 10:
            return None
        if o[0] != n[0] or o[1] != n[1] or n[1] == "hardlink":
            return None
        # the same but for the data offset: one comparison of the whole rows, with the old
        # row's offset lent the new one's for it (the rows are this call's own)
        offset, o[9] = o[9], n[9]
        same = o == n
        o[9] = offset
        if same:
            continue
        if n[1] not in ("file", "dir"):
            return None
        old = row_entry(o)
        if old is None:
            return None
        out.append((old, new[i]))
    return out


def patch_dir(fs: Path, blob_fd: int, pairs: Sequence[tuple[Entry, Entry]], *, name: str) -> None:
    """Rewrite ``fs`` (the old layer's directory) so it holds the new layer: each pair's
    file bytes from the new layer's tar ``blob_fd`` (checked against the TOC's blake3) and
    metadata.  Directory times last."""
    import blake3

    root = str(fs)
    is_root = os.geteuid() == 0
    dir_times: list[tuple[str, int]] = []
    for old, new in pairs:
        rel = new.path
        if rel and not inside_layer(rel):
            raise InvalidInput(f"{name}: bad path {rel!r} in the layer's table of contents")
        path = os.path.join(root, rel) if rel else root  # "": the layer's root directory
        if new.type == "file" and (old.digest, old.size) != (new.digest, new.size):
            write_file(blob_fd, new, path, name, blake3.blake3, in_place=True)
        try:
            os.chown(path, new.uid, new.gid, follow_symlinks=False)
        except PermissionError:
            if is_root:
                raise
        os.chmod(path, new.mode & 0o7777)  # after chown: chown clears setuid/setgid
        if old.xattrs != new.xattrs:
            _xattrs(path, old.xattrs, new.xattrs, name, rel)
        ns = new.mtime * 1_000_000_000
        if new.type == "dir":
            dir_times.append((path, ns))
        else:
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
    for path, ns in dir_times:
        os.utime(path, ns=(ns, ns), follow_symlinks=False)


def _xattrs(
    path: str,
    old: Sequence[tuple[str, bytes]],
    new: Sequence[tuple[str, bytes]],
    name: str,
    rel: str,
) -> None:
    keep = {k for k, _ in new}
    try:
        for key, _ in old:
            if key not in keep and not key.startswith(_FORBIDDEN_XATTR_PREFIXES):
                os.removexattr(path, key, follow_symlinks=False)
        for key, value in new:
            if not key.startswith(_FORBIDDEN_XATTR_PREFIXES):
                os.setxattr(path, key, value, follow_symlinks=False)
    except OSError as exc:
        raise InvalidInput(f"{name}: cannot set xattrs on {rel!r}: {exc.strerror}") from exc


def read_record(path: Path) -> str | None:
    """The layer directory name a shape record names (None when there is none)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def write_record(path: Path, layer: str) -> None:
    """Record ``layer`` as the directory of its shape (atomically; last writer wins)."""
    from cache.home import write_record as replace

    replace(path, layer)
