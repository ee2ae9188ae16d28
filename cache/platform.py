"""This machine's platform as OCI and Go spell it: os, architecture, variant."""

from __future__ import annotations

import platform

# platform.machine() -> (GOARCH, variant)
_ARCHES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def host_platform() -> tuple[str, str, str]:
    """(os, architecture, variant) of this machine; lbuild builds for the host only."""
    machine = platform.machine().lower()
    arch, variant = _ARCHES.get(machine, (machine, ""))
    return "linux", arch, variant
