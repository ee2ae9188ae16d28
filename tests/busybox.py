"""Test helpers for the busybox base image (see fixtures/busybox/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.solve.executor import RunSpec

BUSYBOX = Path("/bin/busybox")
RECIPE = Path(__file__).resolve().parent.parent / "fixtures" / "busybox"


def applets() -> list[str]:
    """The applet names the installed busybox provides."""
    out = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True)
    return [name for name in out.stdout.split() if name and "/" not in name]


def _finish_dirs(rootfs: Path) -> None:
    # git keeps neither empty directories nor their modes: set them here.
    (rootfs / "tmp").mkdir(exist_ok=True)
    (rootfs / "root").mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    for name in ("passwd", "group"):
        os.chmod(rootfs / "etc" / name, 0o644)


def make_busybox_context(dest: Path) -> Path:
    """Write the build context of the busybox image (Dockerfile, busybox, rootfs/) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(RECIPE / "Dockerfile", dest / "Dockerfile")
    shutil.copytree(RECIPE / "rootfs", dest / "rootfs", dirs_exist_ok=True)
    shutil.copyfile(BUSYBOX, dest / "busybox")
    os.chmod(dest / "busybox", 0o755)
    _finish_dirs(dest / "rootfs")
    return dest


def make_busybox_rootfs(dest: Path) -> Path:
    """Write the unpacked busybox root filesystem to ``dest`` (what the image unpacks to)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RECIPE / "rootfs", dest, dirs_exist_ok=True)
    _finish_dirs(dest)
    bindir = dest / "bin"
    bindir.mkdir(mode=0o755, exist_ok=True)
    shutil.copyfile(BUSYBOX, bindir / "busybox")
    os.chmod(bindir / "busybox", 0o755)
    # What `busybox --install -s /bin` makes: absolute symlinks to the binary.
    for name in applets():
        link = bindir / name
        if name != "busybox" and not link.exists():
            link.symlink_to("/bin/busybox")
    return dest


SHELL_PATH = (("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),)
"""The PATH a shell in a busybox rootfs runs with."""


def shell_spec(script: str, **kw: object) -> RunSpec:
    """A RunSpec for ``sh -c script`` as root in ``/`` with SHELL_PATH; ``kw`` overrides
    any field."""
    from builder.solve.executor import RunSpec

    base: dict[str, object] = {
        "argv": ("/bin/sh", "-c", script),
        "env": SHELL_PATH,
        "cwd": "/",
        "uid": 0,
        "gid": 0,
        "groups": (),
    }
    base.update(kw)
    return RunSpec(**base)  # type: ignore[arg-type]
