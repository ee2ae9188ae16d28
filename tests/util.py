"""Test helpers: run the real CLI, unpack images with the real tools, describe file trees."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def lbuild(*args: str | os.PathLike[str], home: Path, check: bool = True, env: dict[str, str] | None = None,
           cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real ``lbuild`` command line in a subprocess."""
    e = dict(os.environ)
    e["LBUILD_HOME"] = str(home)
    e.pop("SOURCE_DATE_EPOCH", None)
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True,
                       text=True, env=e, cwd=cwd or ROOT, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"lbuild {' '.join(map(str, args))} exited {p.returncode}:\n"
                             f"{p.stdout}\n{p.stderr}")
    return p


def layout_build_cmd(ctx: Path, home: Path, out: Path) -> list[str]:
    """The argv of ``lbuild build CTX`` into the OCI layout OUT with home HOME, plain
    progress: what the SIGKILL checks start and kill (tests/test_cache_crash.py,
    bench/sigkill_campaign.py)."""
    return [sys.executable, "-m", "builder", "build", str(ctx), "--home", str(home),
            "--output", f"type=oci,dest={out}", "--progress", "plain"]


def epoch_env(epoch: str) -> dict[str, str]:
    """This process's environment with SOURCE_DATE_EPOCH ``epoch`` and no LBUILD_HOME."""
    env = dict(os.environ)
    env["SOURCE_DATE_EPOCH"] = epoch
    env.pop("LBUILD_HOME", None)
    return env


def tool(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def tree(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Describe every path under ``root``: (type, mode, uid, gid, sha256 or link target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in skip or any(rel.startswith(s + "/") for s in skip):
                continue
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0o777, st.st_uid, st.st_gid, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, st.st_uid, st.st_gid, None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, st.st_uid, st.st_gid, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", mode, st.st_uid, st.st_gid, None)
    return out


def umoci_unpack(layout: Path, dest: Path, tag: str = "latest") -> Path:
    """Unpack an OCI layout with umoci; returns the rootfs path."""
    if dest.exists():
        shutil.rmtree(dest)
    tool("umoci", "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"


def validate_layout(layout: Path, tag: str = "latest") -> dict[str, Any]:
    """Every check PEERS.md asks for; returns the image config as skopeo sees it."""
    tool("oci-image-tool", "validate", "--type", "image", "--ref", f"name={tag}", layout)
    tool("skopeo", "inspect", f"oci:{layout}:{tag}")
    cfg: dict[str, Any] = json.loads(tool("skopeo", "inspect", "--config", f"oci:{layout}:{tag}").stdout)
    return cfg


def manifest_digest(layout: Path, tag: str = "latest") -> str:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m["digest"])
    raise AssertionError(f"tag {tag} not in {layout}/index.json")


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            p.write_text(content)
        else:
            p.write_bytes(content)


def write_memo_ready(root: Path, files: dict[str, str | bytes]) -> None:
    """``write_files``, then make every file (and ``root``) old enough for a no-op memo to
    vouch for it: mtimes set far back, and a wait until their ctimes (which utime sets to
    now) are out of ``builder.noop.RACY_NS`` (a condition, not a timing margin)."""
    import time

    from builder.noop import RACY_NS

    write_files(root, files)
    paths = [root / rel for rel in files] + [root]
    for p in paths:
        os.utime(p, (1_000_000_000, 1_000_000_000))
    newest = max(p.lstat().st_ctime_ns for p in paths)
    while time.time_ns() - newest <= RACY_NS:
        time.sleep(0.1)
