"""RUN's seccomp allowlist, call by call against moby's default profile on x86_64 (issue 11
item 1): the checked-in lists in fixtures/seccomp/ are the names moby's profile allows there
with Docker's default capabilities (see their headers for the commit they come from)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from util import FIXTURES, ROOT

from builder.solve import seccomp

MOBY = FIXTURES / "seccomp"


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and ln[0] != "#"]


def test_every_call_moby_allows_is_allowed_here() -> None:
    moby = set(_lines(MOBY / "moby-default-syscalls.txt"))
    assert len(moby) > 300 and "read" in moby and "mount" not in moby
    assert sorted(moby - set(seccomp.ALLOWED)) == []


def test_every_call_allowed_here_is_mobys_or_a_documented_exception() -> None:
    moby = set(_lines(MOBY / "moby-default-syscalls.txt"))
    extra = set(seccomp.ALLOWED) - moby
    assert sorted(extra) == sorted(seccomp.NOT_DOCKERS_ON_X86_64)
    assert all(seccomp.NOT_DOCKERS_ON_X86_64.values())
    # each exception is in docs/hardening.md's seccomp table
    doc = (ROOT / "docs" / "hardening.md").read_text()
    table = doc[doc.index("### Seccomp: lbuild's allowlist against moby's"):]
    listed = set(re.findall(r"`([a-z0-9_]+)`", table.split("\n\n", 2)[1]))
    assert set(seccomp.NOT_DOCKERS_ON_X86_64) <= listed


def test_conditional_rules_are_mobys() -> None:
    moby_allow: set[tuple[str, tuple[tuple[int, str, int], ...]]] = set()
    moby_errno: set[tuple[str, int]] = set()
    for ln in _lines(MOBY / "moby-default-conditional.txt"):
        name, kind, *rest = ln.split()
        if kind == "errno":
            moby_errno.add((name, int(rest[0])))
        else:
            args = tuple((int(rest[i]), rest[i + 1], int(rest[i + 2]))
                         for i in range(0, len(rest), 3))
            moby_allow.add((name, args))
    assert set(seccomp._CONDITIONAL) == moby_allow
    profile = seccomp.oci_profile()
    errnos = {(n, r["errnoRet"]) for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ERRNO"
              for n in r["names"]}
    assert errnos == moby_errno
    # no name is both unconditional and conditional (the conditions would mean nothing)
    assert not {n for n, _ in moby_allow} & set(seccomp.ALLOWED)


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a filter without no_new_privs needs root")
def test_the_built_in_filter_denies_af_alg_and_af_vsock_only() -> None:
    """The socket rules compiled by libseccomp (LT/EQ/GT) do what the table says."""
    import socket

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter stays with this child
        try:
            seccomp.load()
            out = []
            for family in (socket.AF_UNIX, socket.AF_INET, 38, 39, 40, 41):
                try:
                    os.close(socket.socket(family, socket.SOCK_DGRAM).detach())
                    out.append("ok")
                except OSError as e:
                    out.append(errno.errorcode.get(e.errno or 0, "?"))
            os.write(w, " ".join(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096).decode().split()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(got) == 6
    assert got[0] == got[1] == "ok"
    assert got[2] == got[4] == "EPERM"  # AF_ALG, AF_VSOCK: the filter
    assert "EPERM" not in (got[3], got[5])  # 39, 41: the kernel answers (no such family)
