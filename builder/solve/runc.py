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
      └─ runc --root <tmpfs> run --bundle ...   PID 1 of a PID namespace of its own, so
           └─ the command (PID 1 of the          that killing runc kills the container too
              container's PID namespace)

runc keeps its state in the helper's tmpfs and its log in a file there; everything vanishes
with the helper's mount namespace.  The command's stdout and stderr are runc's (the output
pipe); an error runc reports (its JSON log) is turned into one line for the builder.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from builder.solve import policy, seccomp

__all__ = ["available", "bundle_config", "exec_failure_code", "runc_errors"]


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
        "mounts": mounts,
        "linux": {
            # No "network" entry: the container keeps the helper's network namespace (its
            # own, served by slirp4netns; empty for --network=none; the host's for host).
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": list(policy.MASKED_PATHS),
            "readonlyPaths": list(policy.READONLY_PATHS),
            "seccomp": seccomp.oci_profile(),
        },
    }


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
