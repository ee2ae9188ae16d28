"""An edited layer's directory made from its previous version's (issue 16 item 1,
``cache.snapshots.reuse``): the directory is taken over and patched in place, and the tree
it shows is the one unpacking the edited layer whole shows (compared path by path with a
snapshotter that never saw the previous version, for fixed and random edits, link counts
included); a directory a mount shows or this build's chain holds is never taken; a chain
whose directory was taken is made again; the GC forgets records of directories that went."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
import run_fixtures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_fixtures import build
from test_snapshot_layers import Layers, d, f, shown
from util import manifest_digest

from cache.errors import NotFound
from cache.snapshots.reuse import PATCH_MIN_ENTRIES
from cache.snapshots.snapshot import OverlaySnapshotter, ensure_chain
from cache.snapshots.verify import prune_snapshots, verify_snapshots
from cache.types import Digest, Entry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts overlays: needs root")
T = 1_500_000_000


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            s = os.lstat(p)
            rel = str(p.relative_to(root))
            what: object = None
            if stat.S_ISREG(s.st_mode):
                what = p.read_bytes()
            elif stat.S_ISLNK(s.st_mode):
                what = os.readlink(p)
            xattrs = sorted(os.listxattr(p, follow_symlinks=False))
            out[rel] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                        s.st_nlink, s.st_size, int(s.st_mtime) if not stat.S_ISLNK(s.st_mode)
                        else 0, what, xattrs)  # fmt: skip
    return out


def big_layer(extra: list[Entry] | None = None, skip: frozenset[str] = frozenset()) -> list[Entry]:
    """A COPY-like layer of ``PATCH_MIN_ENTRIES`` files and more under app/."""
    out = [d("app"), d("app/src"), d("app/src/a"), d("app/src/b")]
    for i in range(PATCH_MIN_ENTRIES + 8):
        out.append(f(f"app/src/{'ab'[i % 2]}/f{i:03}.py", f"print({i})\n".encode()))
    out = [e for e in out if e.path not in skip]
    return out + (extra or [])


def edited(layer: list[Entry], path: str, data: bytes) -> list[Entry]:
    return [f(e.path, data, e.mode) if e.path == path else e for e in layer]


def both(
    tmp_path: Path, ls: Layers, below: list[Digest], before: Digest, after: Digest
) -> tuple[OverlaySnapshotter, dict[str, tuple[object, ...]], dict[str, tuple[object, ...]]]:
    """The edited chain shown by a snapshotter that had ``before`` (so it may reuse its
    directory) and by one that never saw it (so it unpacks ``after`` whole)."""
    reused = OverlaySnapshotter(tmp_path / "reused")
    ensure_chain(reused, [*below, before], ls.open, ls.toc)
    reused = OverlaySnapshotter(tmp_path / "reused")  # the next build: nothing pinned
    top = ensure_chain(reused, [*below, after], ls.open, ls.toc)
    whole = OverlaySnapshotter(tmp_path / "whole")
    top2 = ensure_chain(whole, [*below, after], ls.open, ls.toc)
    with shown(reused, top, tmp_path / "m1") as r1, shown(whole, top2, tmp_path / "m2") as r2:
        return reused, tree(r1), tree(r2)


def inode_of(snap: OverlaySnapshotter, rel: str) -> dict[str, int]:
    """Layer directory name -> inode of ``rel`` in it, for the directories that have it."""
    out: dict[str, int] = {}
    for p in snap.layers_dir.iterdir():
        with_it = p / "fs" / rel
        if with_it.exists():
            out[p.name] = with_it.stat().st_ino
    return out


def test_a_one_file_edit_takes_the_previous_directory_over(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"), d("tmp", 0o1777))]
    before = ls.add(*big_layer())
    root = tmp_path / "snapshots"
    snap = OverlaySnapshotter(root / "overlay")
    ensure_chain(snap, [*below, before], ls.open, ls.toc)
    [(old_dir, ino)] = inode_of(snap, "app/src/b/f001.py").items()
    after = ls.add(*edited(big_layer(), "app/src/a/f002.py", b"print('edited')\n"))
    snap = OverlaySnapshotter(root / "overlay")  # the next build
    top = ensure_chain(snap, [*below, after], ls.open, ls.toc)
    # the same inode under the new layer's name; the old name is gone
    [(new_dir, ino2)] = inode_of(snap, "app/src/b/f001.py").items()
    assert ino2 == ino and new_dir != old_dir
    assert not (snap.layers_dir / old_dir).exists()
    with shown(snap, top, tmp_path / "m") as r:
        assert (r / "app/src/a/f002.py").read_bytes() == b"print('edited')\n"
        assert (r / "app/src/b/f003.py").read_bytes() == b"print(3)\n"
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []
    _reused, got, want = both(tmp_path / "cmp", ls, below, before, after)
    assert got == want
    assert got["app/src/a/f002.py"][-2] == b"print('edited')\n"


def test_the_taken_chain_is_made_again_when_needed(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    before = ls.add(*big_layer())
    after = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"v2\n"))
    snap = OverlaySnapshotter(tmp_path / "s")
    old_top = ensure_chain(snap, [*below, before], ls.open, ls.toc)
    snap = OverlaySnapshotter(tmp_path / "s")
    ensure_chain(snap, [*below, after], ls.open, ls.toc)
    snap = OverlaySnapshotter(tmp_path / "s")
    with pytest.raises(NotFound, match="is gone"):
        snap.view("v", old_top)  # its stack names a directory that was taken over
    ls.opened.clear()
    again = ensure_chain(snap, [*below, before], ls.open, ls.toc, reuse=False)
    assert again == old_top and ls.opened == [before]  # unpacked whole, under the same name
    with shown(snap, old_top, tmp_path / "m") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"print(0)\n"
    # the edited chain's directory was not taken back (reuse=False)
    new_top = ensure_chain(snap, [*below, after], ls.open, ls.toc)
    with shown(snap, new_top, tmp_path / "m2") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"v2\n"


def test_a_mounted_directory_is_not_taken(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    before = ls.add(*big_layer())
    after = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"v2\n"))
    other = OverlaySnapshotter(tmp_path / "s")  # another build, RUN over the old version
    old_top = ensure_chain(other, [*below, before], ls.open, ls.toc)
    with shown(other, old_top, tmp_path / "m") as r:
        snap = OverlaySnapshotter(tmp_path / "s")
        old = inode_of(snap, "app/src/b/f001.py")
        top = ensure_chain(snap, [*below, after], ls.open, ls.toc)
        now = inode_of(snap, "app/src/b/f001.py")
        assert len(now) == 2 and set(old.items()) < set(now.items())  # unpacked whole
        assert (r / "app/src/a/f000.py").read_bytes() == b"print(0)\n"
    with shown(snap, top, tmp_path / "m2") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"v2\n"


def test_a_directory_this_chain_holds_is_not_taken(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    first = ls.add(*big_layer())
    second = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"second\n"))  # same shape
    snap = OverlaySnapshotter(tmp_path / "s")
    top = ensure_chain(snap, [*below, first, second], ls.open, ls.toc)
    assert len(inode_of(snap, "app/src/a/f000.py")) == 2
    with shown(snap, top, tmp_path / "m") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"second\n"


def test_edits_reuse_cannot_patch_unpack_whole(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    base = big_layer([Entry(path="app/l", type="symlink", mode=0o777, link="src", mtime=T)])
    before = ls.add(*base)
    retargeted = [
        Entry(path="app/l", type="symlink", mode=0o777, link="src/a", mtime=T)
        if e.path == "app/l"
        else e
        for e in base
    ]
    after = ls.add(*retargeted)
    snap, got, want = both(tmp_path, ls, below, before, after)
    assert got == want and got["app/l"][-2] == "src/a"
    assert len(inode_of(snap, "app/src/a/f000.py")) == 2  # the old one is still there


_FILES = ["app/src/a/f000.py", "app/src/b/f001.py", "app/src/a/f002.py", "app/y"]
_CHANGE = st.sampled_from(["keep", "edit", "mode", "owner", "mtime", "xattr", "drop", "to_dir"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.lists(_CHANGE, min_size=len(_FILES), max_size=len(_FILES)),
    dir_mode=st.sampled_from([0o755, 0o700, 0o2775]),
    dir_mtime=st.sampled_from([T - 100, T + 5]),
)
def test_random_edits_show_what_the_whole_layer_shows(
    tmp_path_factory: pytest.TempPathFactory, changes: list[str], dir_mode: int, dir_mtime: int
) -> None:
    tmp_path = tmp_path_factory.mktemp("rand")
    ls = Layers(tmp_path)
    below = [ls.add(d("app"), f("app/below", b"below\n"))]
    x = (("user.k", b"1"),)
    start = big_layer([Entry(path="app/y", type="file", mode=0o644, size=2, mtime=T,
                             xattrs=x, source=f("app/y", b"y\n").source)])  # fmt: skip
    before = ls.add(*start)
    new = {e.path: e for e in start}
    new["app/src/a"] = Entry(path="app/src/a", type="dir", mode=dir_mode, mtime=dir_mtime)
    for p, change in zip(_FILES, changes, strict=True):
        e = new[p]
        if change == "edit":
            new[p] = Entry(**{**e.__dict__, "size": 9, "source": f(p, b"edited!!\n").source})
        elif change in ("mode", "owner", "mtime"):
            field, value = {"mode": ("mode", 0o4755), "owner": ("uid", 1000),
                            "mtime": ("mtime", T + 77)}[change]  # fmt: skip
            new[p] = Entry(**{**e.__dict__, field: value})
        elif change == "xattr":
            new[p] = Entry(**{**e.__dict__, "xattrs": (("user.z", b"zz"),)})
        elif change == "drop":
            del new[p]
        elif change == "to_dir":
            new[p] = d(p, 0o750)
    after = ls.add(*new.values())
    _snap, got, want = both(tmp_path, ls, below, before, after)
    assert got == want


def test_the_gc_forgets_records_of_directories_that_went(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    root = tmp_path / "snapshots"
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    before = ls.add(*big_layer())
    snap = OverlaySnapshotter(root / "overlay")
    top = ensure_chain(snap, [*below, before], ls.open, ls.toc)
    records = list((root / "overlay/shapes").iterdir())
    assert len(records) == 1
    assert prune_snapshots(root, ls.store.has) == []
    assert list((root / "overlay/shapes").iterdir()) == records  # its directory is there
    snap.remove(top)
    prune_snapshots(root, ls.store.has)  # no chain names the directory: it goes, and its record
    assert list((root / "overlay/shapes").iterdir()) == []
    after = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"v2\n"))
    ls.opened.clear()
    snap = OverlaySnapshotter(root / "overlay")
    top = ensure_chain(snap, [*below, after], ls.open, ls.toc)
    assert verify_snapshots(root, ls.toc_or_none, ls.open) == []
    with shown(snap, top, tmp_path / "m") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"v2\n"


busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome


@pytest.mark.slow
@run_fixtures.needs_root
def test_a_run_over_an_edited_copy_builds_the_image_a_fresh_home_builds(
    bbhome: Path, busybox_home: Path, tmp_path: Path
) -> None:
    body = (
        "FROM busybox:test\n"
        "COPY --link src/ /app/src/\n"
        "RUN cd /app && find . | sort | xargs ls -ld --full-time > /listing"
        " && find . -type f | sort | xargs cat > /contents\n"
    )
    files: dict[str, str | bytes] = {
        f"src/{'ab'[i % 2]}/f{i:03}.py": f"print({i})\n" for i in range(PATCH_MIN_ENTRIES + 8)
    }
    ctx = tmp_path / "ctx"
    epoch = {"SOURCE_DATE_EPOCH": "1700000000"}  # the RUN's own files: comparable times
    build(ctx, bbhome, body, "--snapshotter", "overlay", files=files, env=epoch)
    layers = bbhome / "snapshots/overlay/layers"
    count = len(list(layers.iterdir()))
    (ctx / "src/a/f002.py").write_text("print('edited')\n")
    os.chmod(ctx / "src/b/f003.py", 0o755)
    again = build(ctx, bbhome, body, "--snapshotter", "overlay", env=epoch)
    assert len(list(layers.iterdir())) == count, "the edited layer's directory was not reused"
    fresh_home = tmp_path / "fresh"
    shutil.copytree(busybox_home, fresh_home, ignore=shutil.ignore_patterns("snapshots", "memo"))
    fresh = build(ctx, fresh_home, body, "--snapshotter", "overlay", env=epoch)
    assert manifest_digest(again.layout) == manifest_digest(fresh.layout)


def test_a_layer_directory_left_without_its_files_is_made_again(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    layer = ls.add(*big_layer())
    snap = OverlaySnapshotter(tmp_path / "s")
    top = ensure_chain(snap, [*below, layer], ls.open, ls.toc)
    [name] = inode_of(snap, "app/src/a/f000.py")
    shutil.rmtree(snap.layers_dir / name / "fs")  # what a crash mid-way could leave
    snap = OverlaySnapshotter(tmp_path / "s")
    assert ensure_chain(snap, [*below, layer], ls.open, ls.toc) == top
    with shown(snap, top, tmp_path / "m") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"print(0)\n"
    # taking a directory over leaves nothing of it behind in the work area
    after = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"v2\n"))
    snap = OverlaySnapshotter(tmp_path / "s")
    ensure_chain(snap, [*below, after], ls.open, ls.toc)
    assert [p.name for p in (tmp_path / "s/tmp").iterdir()] == []
    assert len(inode_of(snap, "app/src/a/f000.py")) == 1


def test_a_changed_root_entry_is_patched_too(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    root = Entry(path=".", type="dir", mode=0o755, mtime=T - 50)
    before = ls.add(root, *big_layer())
    after = ls.add(Entry(path=".", type="dir", mode=0o750, mtime=T - 60), *big_layer())
    _snap, got, want = both(tmp_path, ls, below, before, after)
    assert got == want
    again = OverlaySnapshotter(tmp_path / "again")
    ensure_chain(again, [*below, before], ls.open, ls.toc)
    [ino] = inode_of(again, "app/src/a/f000.py").values()
    again = OverlaySnapshotter(tmp_path / "again")
    ensure_chain(again, [*below, after], ls.open, ls.toc)
    [(name, ino2)] = inode_of(again, "app/src/a/f000.py").items()
    assert ino2 == ino  # taken over, not unpacked whole
    st = os.lstat(again.layers_dir / name / "fs")
    assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (0o750, T - 60)


@pytest.mark.slow
@run_fixtures.needs_root
def test_a_run_whose_layer_directory_goes_before_it_mounts_makes_its_chain_again(
    bbhome: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another build takes over (or a prune removes) a directory of the RUN's chain between
    the RUN's ensure_chain and its prepare: the race is made to happen here, on the first
    prepare, by removing that directory as the other build would."""
    import io

    from builder.api import build as api_build
    from builder.options import BuildOptions, Output
    from builder.progress import PlainReporter

    ctx = tmp_path / "ctx"
    (ctx / "src").mkdir(parents=True)
    for i in range(PATCH_MIN_ENTRIES + 8):
        (ctx / "src" / f"f{i:03}.py").write_text(f"print({i})\n")
    (ctx / "Dockerfile").write_text(
        "FROM busybox:test\nCOPY --link src/ /app/src/\nRUN cat /app/src/f007.py > /seen\n"
    )
    prepare = OverlaySnapshotter.prepare
    gone: list[str] = []

    def racing(self: OverlaySnapshotter, key: str, parent: str | None) -> Any:
        if not gone and parent is not None:
            layer = (self._cdir(parent) / "layer").read_text()
            shutil.rmtree(self.layers_dir / layer)
            gone.append(layer)
        return prepare(self, key, parent)

    monkeypatch.setattr(OverlaySnapshotter, "prepare", racing)
    out = tmp_path / "oci"
    opts = BuildOptions(context=ctx, home=bbhome, outputs=(Output("oci", out),))
    result = api_build(opts, PlainReporter(io.StringIO()), writer="inline", memo=False)
    assert gone and (bbhome / "snapshots/overlay/layers" / gone[0] / "fs").is_dir()
    assert result.steps_cached < result.steps_total
    from util import umoci_unpack

    assert (umoci_unpack(out, tmp_path / "bundle") / "seen").read_bytes() == b"print(7)\n"


def test_the_gc_removes_the_stacks_of_a_directory_taken_over(tmp_path: Path) -> None:
    ls = Layers(tmp_path)
    root = tmp_path / "snapshots"
    below = [ls.add(d("etc"), f("etc/os-release", b"x\n"))]
    above = ls.add(f("etc/motd", b"hi\n"))  # a layer on top of the edited one
    before = ls.add(*big_layer())
    after = ls.add(*edited(big_layer(), "app/src/a/f000.py", b"v2\n"))
    snap = OverlaySnapshotter(root / "overlay")
    old_top = ensure_chain(snap, [*below, before, above], ls.open, ls.toc)
    snap = OverlaySnapshotter(root / "overlay")
    new_top = ensure_chain(snap, [*below, after, above], ls.open, ls.toc)
    committed = {p.name for p in (root / "overlay/committed").iterdir()}
    gone = prune_snapshots(root, ls.store.has)
    left = {p.name for p in (root / "overlay/committed").iterdir()}
    # the old chain's stacks from the taken layer up went; the new chain and the shared
    # bottom stayed
    assert len(committed - left) == 2 and len(gone) == 2
    assert snap.exists(new_top) and not snap.exists(old_top)
    assert snap.exists(ensure_chain(snap, [*below], ls.open, ls.toc))
    with shown(snap, new_top, tmp_path / "m") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"v2\n"
    snap = OverlaySnapshotter(root / "overlay")
    assert ensure_chain(snap, [*below, before, above], ls.open, ls.toc) == old_top
    with shown(snap, old_top, tmp_path / "m2") as r:
        assert (r / "app/src/a/f000.py").read_bytes() == b"print(0)\n"


_ROW_KINDS = st.sampled_from(["file", "dir", "symlink", "hardlink"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_ROW_KINDS, st.integers(0, 3), st.booleans(), st.sampled_from(["", "x"])),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["mode", "digest", "kind", "path", "offset", "xattr"])), max_size=4),
)
def test_changes_between_toc_files_is_changes_of_their_entries(
    rows: list[tuple[str, int, bool, str]], edits: list[tuple[int, str]]
) -> None:
    """The TOC-file comparison the take-over uses gives, for any two layers, the entries
    that differ (the data offset aside), or None when the directory cannot be taken over:
    another path or type anywhere, a hard link anywhere, or a change to anything but a
    regular file or a directory."""
    from dataclasses import replace

    from cache.layers.toc import dump_toc
    from cache.snapshots.reuse import changes_between

    def changes(a: list[Entry], b: list[Entry]) -> list[tuple[Entry, Entry]] | None:
        if any(x.path != y.path or x.type != y.type or y.type == "hardlink"
               for x, y in zip(a, b, strict=True)):  # fmt: skip
            return None
        pairs = [(x, y) for x, y in zip(a, b, strict=True) if replace(x, offset=0) != replace(y, offset=0)]
        return None if any(y.type not in ("file", "dir") for _, y in pairs) else pairs

    def entry(i: int, kind: str, mode: int, big: bool, link: str) -> Entry:
        return Entry(
            path=f"p{i}", type=kind, mode=0o644 + mode, size=9 if kind == "file" else 0,  # type: ignore[arg-type]
            digest="ab" * 32 if kind == "file" else "", link=link or ("p0" if kind in ("symlink", "hardlink") else ""),
            offset=512 * (i + 1) if kind == "file" else -1,
            xattrs=(("user.a", b"1"),) if big else (),
        )  # fmt: skip

    old = [entry(i, k, m, b, ln) for i, (k, m, b, ln) in enumerate(rows)]
    new = list(old)
    for i, how in edits:
        if i >= len(new):
            continue
        e = new[i]
        new[i] = {
            "mode": replace(e, mode=e.mode ^ 0o100),
            "digest": replace(e, digest="cd" * 32) if e.type == "file" else e,
            "kind": replace(e, type="dir" if e.type != "dir" else "file"),
            "path": replace(e, path=e.path + "-moved"),
            "offset": replace(e, offset=e.offset + 1024),
            "xattr": replace(e, xattrs=() if e.xattrs else (("user.b", b"2"),)),
        }[how]
    assert changes_between(dump_toc(old), new, dump_toc(new)) == changes(old, new)
