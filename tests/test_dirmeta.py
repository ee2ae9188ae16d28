"""Existing directories keep their metadata (issue 9 item 1).

A COPY, ADD or WORKDIR layer carries the parent directories of what it changes with the
metadata they already have; a layer applied without such entries leaves the lower layers'
directories as they were; WORKDIR makes missing levels owned by the current USER; and what a
RUN sees equals the image's merged filesystem as ``umoci unpack`` gives it, under both
snapshotters."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import build, needs_root
from util import umoci_unpack

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome
pytestmark = [needs_root, pytest.mark.slow]

SNAPSHOTTERS = ["overlay", "copy"]

# /home/app 0750 app:app, a COPY into /tmp (1777) and into /home/app, WORKDIR as USER app.
BODY = """\
FROM busybox:test
RUN mkdir -p /home/app && chown app:app /home/app && chmod 0750 /home/app
COPY a.txt /tmp/
COPY x /home/app/
USER app
WORKDIR /srv/app
RUN touch x /tmp/y /home/app/z
USER nobody
RUN touch /tmp/by-nobody
USER root
"""
LISTING = (
    "RUN find / -xdev ! -path /listing -exec stat -c '%n|%f|%u|%g|%Y' {} + > /listing\n"
)
# What the sandbox mounts or makes for the command (not part of the image).
SANDBOX = {"/dev", "/proc", "/sys", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"}


def _last_layer_file(built: run_fixtures.Built, name: str) -> bytes:
    tar = built.layers()[-1].tar
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out["/" + os.path.relpath(p, root)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                int(st.st_mtime),
            )
    return out


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_run_view_is_the_images_merged_filesystem(
    bbhome: Path, tmp_path: Path, snapshotter: str
) -> None:
    files = {"a.txt": "a\n", "x": "x\n"}
    image = build(
        tmp_path / "ctx", bbhome, BODY, "--snapshotter", snapshotter, files=files
    )
    listed = build(
        tmp_path / "ctx", bbhome, BODY + LISTING, "--snapshotter", snapshotter, files=files
    )
    seen: dict[str, tuple[int, int, int, int]] = {}
    for line in _last_layer_file(listed, "listing").decode().splitlines():
        name, mode, uid, gid, mtime = line.split("|")
        seen[name] = (int(mode, 16), int(uid), int(gid), int(mtime))
    rootfs = umoci_unpack(image.layout, tmp_path / "unpacked")
    want = _tree(rootfs)
    for path in SANDBOX:
        seen.pop(path, None)
    seen.pop("/", None)
    # The sandbox's mount points are made in /etc: its time is the RUN's, not the image's.
    assert seen.pop("/etc")[:3] == want.pop("/etc")[:3]
    assert set(seen) == set(want)
    differ = {p: (seen[p], want[p]) for p in want if seen[p] != want[p]}
    assert differ == {}
    assert want["/tmp"][0] & 0o7777 == 0o1777
    assert want["/home/app"][:3] == (0o40750, 1000, 1000)
    assert want["/srv"][:3] == want["/srv/app"][:3] == (0o40755, 1000, 1000)
    assert want["/tmp/by-nobody"][1:3] == (65534, 65534)


def test_copy_layer_carries_parents_as_they_are(bbhome: Path, tmp_path: Path) -> None:
    body = """\
FROM busybox:test
RUN mkdir -p /home/app/sub && chown -R app:app /home/app && chmod 0750 /home/app
COPY a.txt /tmp/
COPY --chmod=0700 d/ /home/app/
COPY --chmod=0600 a.txt /home/app/sub/
USER 4242
WORKDIR /srv/w
"""
    built = build(tmp_path / "ctx", bbhome, body, files={"a.txt": "a\n", "d/f": "f\n"})
    layers = built.layers()
    copy_tmp, copy_dir, copy_sub, workdir = layers[-4:]
    tmp = copy_tmp.get("tmp")
    assert (tmp.type, tmp.mode, tmp.uid, tmp.gid) == ("dir", 0o1777, 0, 0)
    assert copy_tmp.names() == ["tmp", "tmp/a.txt"]
    # --chmod gives the copied files their mode; the existing destination keeps its own.
    app = copy_dir.get("home/app")
    assert (app.mode, app.uid, app.gid) == (0o750, 1000, 1000)
    assert copy_dir.get("home/app/f").mode == 0o700
    assert copy_dir.get("home").mode == 0o755
    sub = copy_sub.get("home/app/sub")
    assert (sub.mode, sub.uid, sub.gid) == (0o755, 1000, 1000)
    assert copy_sub.get("home/app/sub/a.txt").mode == 0o600
    # WORKDIR as a bare uid: N:N for each level it makes.
    assert [(m.name, m.uid, m.gid, m.mode) for m in workdir.members] == [
        ("srv", 4242, 4242, 0o755),
        ("srv/w", 4242, 4242, 0o755),
    ]
