"""What a RUN step may do: Docker's defaults, in one place for both RUN paths (runc, built-in).

- capabilities: Docker's default set (below); every other one is dropped from the bounding
  set, so not even a setuid-root or file-capability binary gets it back;
- masked paths: a file is covered by /dev/null, a directory by an empty read-only tmpfs;
- read-only paths: bind-mounted on themselves read-only;
- the seccomp profile: builder/solve/seccomp.py.
"""

from __future__ import annotations

CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
"""Docker's default capability set (name -> number)."""

CAP_MASK = sum(1 << n for n in CAPABILITIES.values())
"""The set as /proc/PID/status shows it: 00000000a80425fb."""

MASKED_PATHS: tuple[str, ...] = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)
