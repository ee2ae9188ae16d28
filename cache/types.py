"""Value types shared by the whole cache: digests, step keys, layer table-of-contents entries.

Vocabulary (see docs/architecture.md):
- a *Digest* is ``sha256:<64 hex>``: names blobs and anything that leaves the machine;
- a *StepKey* is a 64-hex blake3 of a step's canonical inputs: the cache address of a step;
- an *Entry* is one row of a layer's table of contents (TOC): what a tar member says, plus
  the blake3 of a regular file's content, without the bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NewType, TypeVar

Digest = NewType("Digest", str)
"""``sha256:<hex>`` of some bytes (a blob, a layer tar, a manifest, a config)."""

StepKey = NewType("StepKey", str)
"""blake3 hex of a step's canonical inputs."""

EntryType = Literal[
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque"
]
"""Kinds of TOC entries.  ``whiteout`` deletes ``path``; ``opaque`` hides everything below the
directory ``path`` that lower layers had (written as ``path/.wh..wh..opq``)."""

Compression = Literal["gzip", "zstd", "none"]

MEDIA_TYPES: dict[str, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


_T = TypeVar("_T")
_LOCALS = frozenset({"self", "__fields"})
"""Names the generated ``__init__`` uses itself: no field may have one."""


def direct_init(cls: type[_T]) -> type[_T]:
    """Give a frozen dataclass an ``__init__`` that stores the fields in the new instance's
    ``__dict__`` directly (put above ``@dataclass(frozen=True)``).

    The ``__init__`` dataclasses generates for a frozen class sets each field through
    ``object.__setattr__`` to get past the frozen ``__setattr__``: about three times slower
    than this one, and an edit rebuild makes some 10,000 entries (the context walk, the
    planned layer, its TOC).  Same signature, defaults, equality, hash and frozenness; a
    class with ``__slots__``, ``__post_init__``, a ``default_factory`` or an init-less field
    is refused (``tests/test_types.py`` holds each decorated class to the generated init).
    """
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}: direct_init is for frozen dataclasses")
    if "__slots__" in cls.__dict__ or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: direct_init needs a __dict__ and no __post_init__")
    params: list[str] = []
    body: list[str] = []
    ns: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.default_factory is not dataclasses.MISSING or f.name in _LOCALS:
            raise TypeError(f"{cls.__name__}.{f.name}: direct_init cannot make this field")
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            ns[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"    __fields[{f.name!r}] = {f.name}")
    src = f"def __init__(self, {', '.join(params)}):\n    __fields = self.__dict__\n"
    src += "\n".join(body)
    exec(src, ns)  # names from the class's own fields, as dataclasses does
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def sha256_digest(hexdigest: str) -> Digest:
    """Return the Digest for a sha256 hex string."""
    return Digest("sha256:" + hexdigest)


def digest_hex(d: Digest) -> str:
    """Return the hex part of a ``sha256:`` digest."""
    algo, _, hexpart = d.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise ValueError(f"not a sha256 digest: {d!r}")
    return hexpart


@dataclass(frozen=True)
class ContentRef:
    """Where the bytes of a regular file come from when a layer is written.

    Exactly one of ``host_path`` (a file on this machine, streamed, never held in memory),
    ``blob`` + ``offset`` (a range of an uncompressed layer tar in the content store) or
    ``data`` (small inline bytes, e.g. a heredoc) is set.
    """

    host_path: str | None = None
    blob: Digest | None = None
    offset: int = 0
    data: bytes | None = None
    ident: tuple[int, int] | None = None
    """For ``host_path``: the (device, inode) the context walk saw there.  The layer writer
    opens the path once, without following a symlink, and refuses any other file."""


@direct_init
@dataclass(frozen=True)
class Entry:
    """One row of a layer's table of contents.

    ``path`` is relative to the root, with no leading ``/`` or ``./`` and no trailing ``/``
    (``"app/main.py"``); ``mode`` holds only permission bits (``0o7777``: setuid, setgid,
    sticky included); the file type is in ``type``.  ``digest`` is the blake3 hex of a regular
    file's content (empty otherwise); ``link`` is a symlink's target or, for a hardlink, the
    path (same convention as ``path``) of the entry it links to.  ``offset`` is where the
    file's data starts in the uncompressed layer tar this entry was read from (-1 if unknown).
    ``source`` says where to read content from when writing a new layer; it is not part of
    the TOC's identity.
    """

    path: str
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    digest: str = ""
    link: str = ""
    mtime: int = 0
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()
    offset: int = -1
    source: ContentRef | None = field(default=None, compare=False, hash=False)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

@dataclass(frozen=True)
class LayerInfo:
    """An uncompressed layer tar committed to the content store (its blob name is diff_id)."""

    diff_id: Digest
    size: int
    toc: tuple[Entry, ...]


@dataclass(frozen=True)
class BlobInfo:
    """A (possibly compressed) layer blob: what an OCI manifest's layer descriptor says."""

    digest: Digest
    size: int
    media_type: str
