"""RUN through runc: an OCI bundle generated for one step, and the runc process that runs it.

The executor's helper (builder/solve/executor.py) calls :func:`run_bundle` inside its own
mount (and, unless ``--network=host``, network) namespace, after it has mounted the step's
snapshot on ``<run dir>/rootfs``::

    helper (private mount ns, the sandbox's net ns; run dir = a private tmpfs)
      ├─ bundle/config.json  from bundle_config(): Docker's capabilities, seccomp profile,
      │                      masked and read-only paths, namespaces pid/ipc/uts/mount
      │                      (network: the helper's), /proc /dev /dev/pts /dev/shm
      │                      /dev/mqueue /sys (ro) /sys/fs/cgroup (ro), the generated
      │                      /etc/hosts /etc/resolv.conf /etc/hostname, RUN --mount binds
      └─ reaper: PID 1 of a PID namespace of its own (killing it kills everything below)
           ├─ runc --root <tmpfs> run --detach --bundle ...  (exits once the command runs)
           └─ the command (PID 1 of the container's PID namespace; the reaper's child
              once runc has exited, so the reaper gets its exit status)

Detached, because a foreground runc copies the command's stdout and stderr through pipes of
its own and loses their order; detached, the command writes to the output pipe itself.
runc keeps its state in the helper's tmpfs and its log in a file there; everything vanishes
with the helper's mount namespace, and the helper removes the container's (empty) cgroups
as ``runc delete`` would.  An error runc reports (its JSON log) becomes one line for the
builder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any

from builder.solve import policy, seccomp

__all__ = [
    "available",
    "bundle_config",
    "exec_failure_code",
    "remove_cgroups",
    "runc_errors",
    "sweep_cgroups",
]

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PARENT = "lbuild"
"""runc puts each RUN in ``<hierarchy>/lbuild/<container id>``."""


def available() -> str | None:
    """runc's path when it can be used: installed and we are root (rootless runs need a
    user namespace set up by the built-in executor)."""
    if os.geteuid() != 0:
        return None
    return shutil.which("runc")


def bundle_config(
    spec: dict[str, Any],
    rootfs: str,
    etc_files: dict[str, str],
    extra: list[dict[str, Any]],
    *,
    cgroup: str,
) -> dict[str, Any]:
    """The OCI runtime config (config.json) for one RUN.

    ``spec``: the executor's RunSpec as a dict; ``etc_files``: /etc/NAME -> host file to bind
    (only those that can be mounted safely); ``extra``: RUN --mount binds/tmpfs that can.
    """
    caps = sorted(policy.CAPABILITIES)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {
                "uid": spec["uid"],
                "gid": spec["gid"],
                "additionalGids": list(spec["groups"]),
            },
            "args": list(spec["argv"]),
            "env": [f"{k}={v}" for k, v in spec["env"]],
            "cwd": spec["cwd"],
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": False,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": spec["hostname"],
        "mounts": _mounts(etc_files, extra),
        "linux": {
            # No "network" entry: the container keeps the helper's network namespace (its
            # own, served by slirp4netns; empty for --network=none; the host's for host).
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(policy.MASKED_PATHS),
            # runc 1.1 leaves the tmpfs under a v1 host's /sys/fs/cgroup writable
            "readonlyPaths": [*policy.READONLY_PATHS, "/sys/fs/cgroup"],
            "seccomp": seccomp.oci_profile(),
        },
    }


def _mounts(etc_files: dict[str, str], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """/proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys (ro), /sys/fs/cgroup (ro), the
    generated /etc files, the RUN --mount binds and tmpfs."""
    nsd = ["nosuid", "noexec", "nodev"]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": nsd},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": [*nsd, "mode=1777", "size=65536k"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": nsd},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": [*nsd, "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": [*nsd, "relatime", "ro"],
        },
    ]
    for target, source in etc_files.items():
        mounts.append(
            {"destination": target, "type": "bind", "source": source, "options": ["rbind", "rw"]}
        )
    for m in extra:
        if m["type"] == "tmpfs":
            mounts.append(
                {
                    "destination": m["target"],
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "nodev", "mode=755"],
                }
            )
        else:
            mounts.append(
                {
                    "destination": m["target"],
                    "type": "bind",
                    "source": m["source"],
                    "options": ["rbind", "ro" if m["readonly"] else "rw"],
                }
            )
    return mounts


def _cgroup_parents() -> list[str]:
    """``lbuild`` under every cgroup hierarchy (v1 controllers, the unified v2 tree)."""
    out = [os.path.join(CGROUP_ROOT, CGROUP_PARENT)]
    try:
        entries = list(os.scandir(CGROUP_ROOT))
    except OSError:
        return out
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            out.append(os.path.join(e.path, CGROUP_PARENT))
    return out


def remove_cgroups(cid: str) -> None:
    """Remove container ``cid``'s cgroups: runc does when the command exits, not when it is
    killed (a cancelled RUN).  Only empty cgroups can be removed; errors are ignored."""
    for parent in _cgroup_parents():
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(parent, cid))


def sweep_cgroups(min_age_s: float = 60.0) -> None:
    """Remove the empty cgroups of RUNs whose builder was SIGKILLed (runc died with it).
    Only ones older than ``min_age_s``: a concurrent build's runc may have made its cgroup
    an instant ago and not moved its process in yet."""
    now = time.time()
    for parent in _cgroup_parents():
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue
        for e in entries:
            if not e.name.startswith("lbuild-") or not e.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError):
                if now - e.stat(follow_symlinks=False).st_mtime >= min_age_s:
                    os.rmdir(e.path)  # EBUSY while a process is in it


def runc_errors(log_path: str) -> list[str]:
    """The error messages in runc's JSON log (``--log-format json``)."""
    out: list[str] = []
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "fatal"):
            out.append(" ".join(str(rec.get("msg", "")).split()))
    return out


def exec_failure_code(message: str) -> int | None:
    """127/126 when runc's error is the command's exec failing (as a shell would exit)."""
    if "exec: " not in message and "exec failed" not in message:
        return None
    if "no such file or directory" in message or "not found in $PATH" in message:
        return 127
    return 126
