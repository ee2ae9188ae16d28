"""This machine's platform as OCI and Go spell it: os, architecture, variant."""

from __future__ import annotations

import os

# uname's machine (platform.machine()) -> (GOARCH, variant)
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
    machine = os.uname().machine.lower()
    arch, variant = _ARCHES.get(machine, (machine, ""))
    return "linux", arch, variant


def parse_platform(spec: str) -> tuple[str, str, str]:
    """``os[/arch[/variant]]`` normalised as containerd's ``platforms.Normalize`` does.

    Architecture aliases (x86_64, aarch64, ...) are folded; a missing architecture is the
    host's; arm64's ``v8`` variant is the default and is dropped.  ValueError when malformed.
    """
    parts = spec.strip().lower().split("/")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"invalid platform {spec!r}: expected os[/arch[/variant]]")
    os_name = parts[0]
    _os, host_arch, host_variant = host_platform()
    if len(parts) == 1:
        return os_name, host_arch, host_variant
    arch, variant = _ARCHES.get(parts[1], (parts[1], ""))
    if len(parts) == 3:
        variant = parts[2]
    if arch == "arm64" and variant == "v8":
        variant = ""
    if arch == "amd64" and variant == "v1":
        variant = ""
    return os_name, arch, variant


def can_run(spec: str) -> bool:
    """Whether this host runs images of the platform ``spec`` (its own platform only)."""
    os_name, arch, variant = parse_platform(spec)
    _os, host_arch, host_variant = host_platform()
    return os_name == "linux" and arch == host_arch and variant in ("", host_variant)
