"""A rootless RUN's layer holds the ids a root build would (issue 9 item 5).

The host ids RUN leaves (the caller's, its subordinate ids) are mapped back through the user
namespace; a path of a lower layer keeps the owner the image gave it (the rootless unpack
could not chown it); an id the namespace does not map fails the step with a hint; and a RUN
that fails without subordinate ids says that chown to other ids cannot work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest
from busybox import make_busybox_rootfs

from builder.solve.rootless import IdMap, map_entries
from cache.errors import StepFailed
from cache.types import Entry

ROOT = Path(__file__).resolve().parent.parent
CALLER = 65534


def _e(path: str, uid: int, gid: int, type_: str = "file") -> Entry:
    return Entry(path=path, type=type_, mode=0o644, uid=uid, gid=gid)  # type: ignore[arg-type]


def test_host_ids_map_back_to_container_ids() -> None:
    uids, gids = IdMap(CALLER, 100000, 65536), IdMap(CALLER, 200000, 65536)
    below = {"etc/passwd": _e("etc/passwd", 0, 0), "home/app": _e("home/app", 1000, 1000, "dir")}
    got = map_entries(
        [
            _e("etc/passwd", CALLER, CALLER),  # edited by RUN as root: stays 0:0
            _e("home/app", CALLER, CALLER, "dir"),  # touched below: keeps the image's 1000
            _e("new-root", CALLER, CALLER),  # made by root: 0:0 (it was 65534:65534)
            _e("new-app", 100999, 200999),  # made by uid 1000 through the subordinate ids
            _e("gone", 0, 0, "whiteout"),
        ],
        uids,
        gids,
        below.get,
    )
    assert [(e.path, e.uid, e.gid) for e in got] == [
        ("etc/passwd", 0, 0), ("home/app", 1000, 1000), ("new-root", 0, 0),
        ("new-app", 1000, 1000), ("gone", 0, 0),
    ]


def test_an_unmapped_host_id_fails_the_step() -> None:
    with pytest.raises(StepFailed, match="owned by host ids 4242:4242") as err:
        map_entries([_e("x", 4242, 4242)], IdMap(CALLER), IdMap(CALLER), lambda p: None,
                    file="Dockerfile", line=3)
    assert err.value.hint is not None and "/etc/subuid" in err.value.hint


def test_rootless_run_as_the_real_unprivileged_user(tmp_path: Path) -> None:
    """The executor run by uid 65534 (no subordinate ids): what RUN makes is owned by 65534 on
    the host and maps back to 0; ``chown 1000`` fails inside, and the hint says why."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK) or not shutil.which("setpriv"):
        pytest.skip("no system python3 or setpriv for the unprivileged user")
    area = Path(tempfile.mkdtemp(prefix="lbuild-rootless-ids-"))
    try:
        os.chmod(area, 0o755)
        rootfs = make_busybox_rootfs(area / "rootfs")
        subprocess.run(["chown", "-R", "-h", f"{CALLER}:{CALLER}", str(rootfs)], check=True)
        code = textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from builder.solve.executor import RunSpec, run
            from builder.solve.rootless import current_map, failure_hint
            out = []
            def go(script):
                s = RunSpec(argv=("/bin/sh", "-c", script), env=(("PATH", "/bin"),), cwd="/",
                            uid=0, gid=0, groups=(), network="none")
                return run(s, Path({str(rootfs)!r}), on_output=out.append)
            print(go("mkdir /d && echo x > /d/f"))
            print(go("chown 1000 /d"))
            print(b"".join(out).decode().strip().replace(chr(10), " "))
            print(current_map())
            print(failure_hint())
            """
        )
        p = subprocess.run(
            ["setpriv", "--reuid", str(CALLER), "--regid", str(CALLER), "--clear-groups",
             python, "-c", code],
            capture_output=True, text=True, cwd="/",
            env={"PATH": os.environ["PATH"], "HOME": str(area)}, timeout=60,
        )
        if "cannot map ids" in p.stderr or "unshare" in p.stderr:
            pytest.skip(f"no unprivileged user namespaces here: {p.stderr.strip()[-200:]}")
        assert p.returncode == 0, p.stderr
        made_rc, chown_rc, output, maps, hint = p.stdout.splitlines()
        assert (made_rc, chown_rc) == ("0", "1")
        assert "Invalid argument" in output
        assert maps == f"(IdMap(caller={CALLER}, sub_start=0, sub_count=0), " \
                       f"IdMap(caller={CALLER}, sub_start=0, sub_count=0))"
        assert "without subordinate ids" in hint and "chown" in hint
        st = os.lstat(rootfs / "d" / "f")
        assert (st.st_uid, st.st_gid) == (CALLER, CALLER)
        (mapped,) = map_entries([_e("d/f", st.st_uid, st.st_gid)], IdMap(CALLER), IdMap(CALLER),
                                lambda p: None)
        assert (mapped.uid, mapped.gid) == (0, 0)  # what a root build records
    finally:
        shutil.rmtree(area)
