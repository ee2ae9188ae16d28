"""lbuild's local store as an image source for ``lbuild diff`` and ``lbuild repro-check``.

``LocalStore(home)`` opens the cache home lazily (only when a reference is not a path) and
resolves a tag (``lbuild build -t NAME``), or a registry reference (``docker://REF``, or
``HOST/...`` that is not a local tag: pulled into the store as FROM pulls it), to a
``source.Image`` whose layers are read from the store: the uncompressed tar under its diff_id when the store keeps it (lbuild does), else the
compressed blob.  ``export_base`` writes such an image as an OCI layout, which is how
repro-check hands a local base image to builds that run in throwaway homes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from builder.compare.source import Image, Layer

if TYPE_CHECKING:
    from cache.index.reader import FastIndex
    from cache.session import Session
    from cache.store.blobs import BlobStore

__all__ = ["LocalStore"]


class LocalStore:
    """A resolver over one cache home (a ``source.LocalResolver``); close it when done."""

    def __init__(self, home: Path | None) -> None:
        self._home = home
        self._stack = contextlib.ExitStack()
        self._session: Session | None = None
        self._fast: tuple[FastIndex, BlobStore] | None = None
        self._tried_fast = False

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._session = None
        self._fast = None
        self._tried_fast = False

    def fast(self) -> tuple[FastIndex, BlobStore] | None:
        """The stdlib read path (no SQLAlchemy) under the home's shared lock, when the home
        has an index of the current schema; None otherwise (``session()`` then)."""
        if not self._tried_fast:
            self._tried_fast = True
            from cache.home import Home, home_dir, lock_home
            from cache.index.reader import FastIndex
            from cache.store.blobs import BlobStore

            home = home_dir(self._home)
            if Home(home).db.is_file():
                self._stack.enter_context(lock_home(home, exclusive=False))
                index = FastIndex.open(Home(home).db)
                if index is not None:
                    self._stack.callback(index.close)
                    self._fast = (index, BlobStore(home))
        return self._fast

    def store(self) -> BlobStore:
        fast = self.fast()
        return fast[1] if fast is not None else self.session().store

    def session(self) -> Session:
        if self._session is None:
            from cache.session import Session

            self._session = self._stack.enter_context(Session.open(self._home))
        return self._session

    def manifest_digest(self, ref: str) -> str | None:
        """The manifest digest tagged ``ref`` in the store, or None."""
        from builder.options import full_tag
        from cache.errors import InvalidInput

        try:
            name = full_tag(ref)
        except InvalidInput:
            return None
        fast = self.fast()
        found = (fast[0] if fast is not None else self.session().index).get_tag(name)
        return None if found is None else str(found.manifest_digest)

    def __call__(self, ref: str) -> Image | None:
        if ref.startswith("docker://"):
            return self._image(ref, self.pull(ref.removeprefix("docker://")))
        digest = self.manifest_digest(ref)
        if digest is None and _names_a_registry(ref):
            digest = self.pull(ref)
        return None if digest is None else self._image(ref, digest)

    def pull(self, name: str) -> str:
        """Pull ``name`` into the store (one HEAD when its tag is known); its manifest digest."""
        from builder.pull import resolve_remote

        return str(resolve_remote(self.session(), name, refresh=True))

    def _image(self, ref: str, digest: str) -> Image:
        from cache.types import Digest

        store = self.store()
        manifest = json.loads(store.read(Digest(digest)))
        config_digest = Digest(manifest["config"]["digest"])
        config = json.loads(store.read(config_digest))
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        layers = []
        for i, desc in enumerate(manifest.get("layers", [])):
            diff_id = str(diff_ids[i]) if i < len(diff_ids) else ""
            plain = bool(diff_id) and store.has(Digest(diff_id))
            blob = Digest(diff_id if plain else desc["digest"])
            layers.append(
                Layer(
                    index=i,
                    media_type=str(desc.get("mediaType", "")),
                    digest=str(desc["digest"]),
                    size=int(desc.get("size", -1)),
                    diff_id=diff_id,
                    opener=_store_opener(store.open, blob),
                )
            )
        return Image(
            ref=ref,
            kind="local",
            manifest_digest=digest,
            manifest=manifest,
            config_digest=str(config_digest),
            config=config,
            layers=tuple(layers),
        )

    def export_base(self, ref: str, dest: Path) -> bool:
        """Write the image tagged ``ref`` as an OCI layout at ``dest`` (tag ``latest``);
        False when the store has no such tag."""
        from cache.types import Digest

        digest = self.manifest_digest(ref)
        if digest is None:
            return False
        store = self.store()
        if _link_layout(store, digest, dest):
            return True
        from builder.export.oci import Image as OciImage
        from builder.export.oci import export_oci_layout
        from builder.images import image_from_store

        ext = image_from_store(store, ref, Digest(digest))
        manifest_bytes = store.read(Digest(digest))
        manifest: dict[str, Any] = json.loads(manifest_bytes)
        config_digest = Digest(manifest["config"]["digest"])
        image = OciImage(
            manifest_digest=Digest(digest),
            manifest=manifest_bytes,
            config_digest=config_digest,
            config=store.read(config_digest),
            layers=ext.layers,
            diff_ids=ext.diff_ids,
        )
        export_oci_layout(store, image, dest, "latest")
        return True


def _link_layout(store: BlobStore, digest: str, dest: Path) -> bool:
    """Write the image as an OCI layout (tag ``latest``) whose blobs are hard links to the
    store's (copies across filesystems); False, with nothing written, when a blob the
    manifest names is not in the store (``export_oci_layout`` then makes it again)."""
    import os
    import shutil

    from cache.types import Digest

    manifest_bytes = store.read(Digest(digest))
    manifest: dict[str, Any] = json.loads(manifest_bytes)
    config = json.loads(store.read(Digest(manifest["config"]["digest"])))
    blobs = [Digest(digest), Digest(manifest["config"]["digest"])]
    blobs += [Digest(x["digest"]) for x in manifest.get("layers", [])]
    if not all(store.has(b) for b in blobs):
        return False
    out = dest / "blobs" / "sha256"
    out.mkdir(parents=True)
    for b in dict.fromkeys(blobs):
        src, to = store.path(b), out / b.split(":", 1)[1]
        try:
            os.link(src, to)
        except OSError:
            shutil.copyfile(src, to)
    platform = {k: config.get(k) for k in ("architecture", "os", "variant")}
    desc = {
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
        "digest": str(digest),
        "mediaType": manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
        "platform": {k: v for k, v in platform.items() if v},
        "size": len(manifest_bytes),
    }
    index = {
        "manifests": [desc],
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "schemaVersion": 2,
    }
    (dest / "index.json").write_text(json.dumps(index, sort_keys=True))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return True


def _names_a_registry(ref: str) -> bool:
    """Whether a reference starts with a registry host (``host.tld/``, ``host:port/``,
    ``localhost/``): only those are pulled, so a mistyped local tag never goes to Docker Hub."""
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def _store_opener(open_blob: Callable[[Any], BinaryIO], blob: Any) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open_blob(blob)

    return opener
