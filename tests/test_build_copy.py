"""End-to-end COPY and ADD through the real CLI, checked by unpacking the image with umoci.

Every test builds a small image from a Dockerfile, validates the layout with oci-image-tool
and skopeo, unpacks it with umoci and compares the WHOLE unpacked tree (path, type, mode,
uid, gid, content digest, link target) with a tree written out by hand here.  The helpers at
the top are shared by the other ``test_build_*`` modules.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from util import lbuild, manifest_digest, tree, umoci_unpack, validate_layout, write_files

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("skopeo", "umoci", "oci-image-tool")),
    reason="needs skopeo, umoci and oci-image-tool",
)

Tree = dict[str, tuple[Any, ...]]


# --- helpers shared by the test_build_* modules ---------------------------------------------


def sha(data: str | bytes) -> str:
    """sha256 hex of text or bytes, as ``util.tree`` records a file's content."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def F(data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> tuple[Any, ...]:
    """An expected regular file."""
    return ("file", mode, uid, gid, sha(data))


def D(mode: int = 0o755, uid: int = 0, gid: int = 0) -> tuple[Any, ...]:
    """An expected directory."""
    return ("dir", mode, uid, gid, None)


def L(target: str, uid: int = 0, gid: int = 0) -> tuple[Any, ...]:
    """An expected symlink."""
    return ("symlink", 0o777, uid, gid, target)


@dataclass(frozen=True)
class Built:
    """One image built through the CLI: its layout, config (as skopeo sees it) and rootfs."""

    layout: Path
    config: dict[str, Any]
    rootfs: Path
    tree: Tree
    stdout: str
    stderr: str

    @property
    def digest(self) -> str:
        return manifest_digest(self.layout)


def build(
    ctx: Path,
    home: Path,
    work: Path,
    dockerfile: str | None = None,
    *extra: str,
    env: dict[str, str] | None = None,
    tag: str = "latest",
    unpack: bool = True,
) -> Built:
    """Build ``ctx`` with ``dockerfile`` (written beside the context, passed with -f) into a
    fresh OCI layout under ``work``; validate it; unpack it with umoci."""
    work.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="b-", dir=work))
    layout = out / "layout"
    args: list[str] = ["build", str(ctx), "--output", f"type=oci,dest={layout}"]
    if dockerfile is not None:
        df = out / "Dockerfile"
        df.write_text(dockerfile)
        args += ["-f", str(df)]
    p = lbuild(*args, "--progress", "plain", *extra, home=home, env=env)
    cfg = validate_layout(layout, tag)
    if not unpack:
        return Built(layout, cfg, out / "bundle" / "rootfs", {}, p.stdout, p.stderr)
    rootfs = umoci_unpack(layout, out / "bundle", tag)
    return Built(layout, cfg, rootfs, tree(rootfs), p.stdout, p.stderr)


def fail(
    ctx: Path,
    home: Path,
    work: Path,
    dockerfile: str | None,
    *extra: str,
    env: dict[str, str] | None = None,
) -> tuple[str, Path]:
    """Run a build that must fail with exit 2; returns (stderr, the --output dest)."""
    work.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="f-", dir=work))
    layout = out / "layout"
    args: list[str] = ["build", str(ctx), "--output", f"type=oci,dest={layout}"]
    if dockerfile is not None:
        df = out / "Dockerfile"
        df.write_text(dockerfile)
        args += ["-f", str(df)]
    # json progress goes to stdout, so stderr holds nothing but the error
    p = lbuild(*args, "--progress", "json", *extra, home=home, env=env, check=False)
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    assert not layout.exists(), "a failed build must not leave its --output behind"
    return lines[0], out / "Dockerfile"


def inode(p: Path) -> int:
    return p.lstat().st_ino


# --- the shared context ---------------------------------------------------------------------

PASSWD = "root:x:0:0:root:/root:/bin/sh\nalice:x:1500:1600::/home/alice:/bin/sh\nbob:x:1501:1700::/:/bin/false\n"
GROUP = "root:x:0:\nstaff:x:1650:alice\nbobs:x:1700:\n"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A context with files of every kind the COPY rules care about (modes set explicitly)."""
    root = tmp_path_factory.mktemp("ctx")
    write_files(
        root,
        {
            "a.txt": "A\n",
            "b.txt": "B\n",
            "c.md": "C\n",
            "ab.log": "log\n",
            "exec.sh": "#!/bin/sh\necho hi\n",
            "dir/x.txt": "X\n",
            "dir/sub/y.txt": "Y\n",
            "dir/sub/deeper/z.txt": "Z\n",
            "suid": b"\x7fELF-ish",
            "etc/passwd": PASSWD,
            "etc/group": GROUP,
            "hl/one": "same inode\n",
            "plain.tar.gz": "not really an archive\n",
        },
    )
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    os.chmod(root, 0o755)
    os.chmod(root / "exec.sh", 0o755)
    os.chmod(root / "dir/sub/y.txt", 0o600)
    os.chmod(root / "dir/sub", 0o750)
    os.chmod(root / "suid", 0o4755)
    os.symlink("x.txt", root / "dir/link")
    os.symlink("/nowhere/abs", root / "dir/abslink")
    os.symlink("a.txt", root / "toplink")
    os.link(root / "hl/one", root / "hl/two")
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    (root / "sgid").mkdir()
    os.chmod(root / "sgid", 0o2755)
    return root


@pytest.fixture(scope="module")
def mhome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lbuild home for the module: builds share their cache, as a user's would."""
    return tmp_path_factory.mktemp("home")


DIR_TREE: Tree = {
    "x.txt": F("X\n"),
    "sub": D(0o750),
    "sub/y.txt": F("Y\n", 0o600),
    "sub/deeper": D(),
    "sub/deeper/z.txt": F("Z\n"),
    "link": L("x.txt"),
    "abslink": L("/nowhere/abs"),
}


def under(prefix: str, t: Tree) -> Tree:
    """``t`` with every path placed below ``prefix``."""
    return {f"{prefix}/{k}": v for k, v in t.items()}


# --- COPY -----------------------------------------------------------------------------------


def test_copy_single_file_and_rename(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY a.txt /a.txt\nCOPY exec.sh /renamed\n")
    assert b.tree == {"a.txt": F("A\n"), "renamed": F("#!/bin/sh\necho hi\n", 0o755)}


def test_copy_file_into_dir_with_slash_creates_parents(
    ctx: Path, mhome: Path, tmp_path: Path
) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY a.txt /d/\nCOPY b.txt /p/q/r/\nCOPY c.md /m/n/file\n",
    )
    assert b.tree == {
        "d": D(),
        "d/a.txt": F("A\n"),
        "p": D(),
        "p/q": D(),
        "p/q/r": D(),
        "p/q/r/b.txt": F("B\n"),
        "m": D(),
        "m/n": D(),
        "m/n/file": F("C\n"),
    }


def test_copy_file_to_existing_dir_without_slash(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY a.txt /exist/\nCOPY b.txt /exist\nWORKDIR /wd\nCOPY c.md /wd\n",
    )
    assert b.tree == {
        "exist": D(),
        "exist/a.txt": F("A\n"),
        "exist/b.txt": F("B\n"),
        "wd": D(),
        "wd/c.md": F("C\n"),
    }


def test_copy_dir_copies_contents_not_the_dir(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY dir /dst\nCOPY dir/ /dst2/\nCOPY dir/sub /\nCOPY dir/sub /s750\n"
        "WORKDIR /old\nCOPY sticky /old\n",
    )
    # BuildKit creates a missing destination directory 0755 (its MkdirAll), whatever the
    # source directory's own mode; the source's children keep theirs.
    assert b.tree == {
        "dst": D(),
        **under("dst", DIR_TREE),
        "dst2": D(),
        **under("dst2", DIR_TREE),
        "y.txt": F("Y\n", 0o600),
        "deeper": D(),
        "deeper/z.txt": F("Z\n"),
        "s750": D(),
        "s750/y.txt": F("Y\n", 0o600),
        "s750/deeper": D(),
        "s750/deeper/z.txt": F("Z\n"),
        "old": D(),
    }


def test_copy_wildcards(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY *.txt /star/\nCOPY ?.md /q/\nCOPY [ab].txt /cls/\n"
        "COPY [^a]*.txt /neg/\nCOPY [!a]*.txt /bang/\nCOPY di? /wdir/\n",
    )
    assert b.tree == {
        "star": D(),
        "star/a.txt": F("A\n"),
        "star/b.txt": F("B\n"),
        "q": D(),
        "q/c.md": F("C\n"),
        "cls": D(),
        "cls/a.txt": F("A\n"),
        "cls/b.txt": F("B\n"),
        "neg": D(),
        "neg/b.txt": F("B\n"),
        # Go's filepath.Match negates with '^' only: "[!a]" is the class {'!', 'a'}
        "bang": D(),
        "bang/a.txt": F("A\n"),
        # a directory matched by a wildcard has its contents copied, like a named one
        "wdir": D(),
        **under("wdir", DIR_TREE),
    }


def test_copy_several_sources_into_dir(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY a.txt b.txt dir/sub /m/\n")
    assert b.tree == {
        "m": D(),
        "m/a.txt": F("A\n"),
        "m/b.txt": F("B\n"),
        "m/y.txt": F("Y\n", 0o600),
        "m/deeper": D(),
        "m/deeper/z.txt": F("Z\n"),
    }


def test_copy_several_sources_to_existing_dir_without_slash(
    ctx: Path, mhome: Path, tmp_path: Path
) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nWORKDIR /m\nCOPY a.txt b.txt /m\n")
    assert b.tree == {"m": D(), "m/a.txt": F("A\n"), "m/b.txt": F("B\n")}


def test_copy_several_sources_without_slash_is_an_error(
    ctx: Path, mhome: Path, tmp_path: Path
) -> None:
    line, df = fail(ctx, mhome, tmp_path, "FROM scratch\n\nCOPY a.txt b.txt /m\n")
    assert f"{df}:3:" in line
    assert "must be a directory and end with a /" in line


def test_copy_relative_dest_with_workdir(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nWORKDIR /app\nCOPY a.txt rel/\nCOPY b.txt .\nWORKDIR sub\n"
        "COPY c.md x\nCOPY exec.sh ./\n",
    )
    assert b.tree == {
        "app": D(),
        "app/rel": D(),
        "app/rel/a.txt": F("A\n"),
        "app/b.txt": F("B\n"),
        "app/sub": D(),
        "app/sub/x": F("C\n"),
        "app/sub/exec.sh": F("#!/bin/sh\necho hi\n", 0o755),
    }
    assert b.config["config"]["WorkingDir"] == "/app/sub"


def test_copy_from_stage_by_name_and_index(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch AS build\nCOPY --chown=5:6 dir /out/\nCOPY a.txt /out/a.txt\n"
        "FROM scratch AS unused\nCOPY nothing-here /\n"
        "FROM scratch\nCOPY --from=build /out/sub /s\nCOPY --from=0 /out/a.txt /x0\n"
        "COPY --from=BUILD /out/link /out/x.txt /both/\n",
    )
    # --from keeps the owners the source stage wrote (no --chown here).
    assert b.tree == {
        "s": D(),
        "s/y.txt": F("Y\n", 0o600, 5, 6),
        "s/deeper": D(0o755, 5, 6),
        "s/deeper/z.txt": F("Z\n", 0o644, 5, 6),
        "x0": F("A\n"),
        # a top-level source that is a symlink is followed, in a stage as in the context
        "both": D(),
        "both/link": F("X\n", 0o644, 5, 6),
        "both/x.txt": F("X\n", 0o644, 5, 6),
    }


def test_copy_chown_numeric(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY --chown=1000:1001 a.txt /o/\nCOPY --chown=7 b.txt /b7\n"
        "COPY --chown=1:2 dir/sub /cs\n",
    )
    # Directories that COPY creates belong to the --chown owner too (BuildKit's MkdirAll).
    assert b.tree == {
        "o": D(0o755, 1000, 1001),
        "o/a.txt": F("A\n", 0o644, 1000, 1001),
        "b7": F("B\n", 0o644, 7, 7),
        "cs": D(0o755, 1, 2),
        "cs/y.txt": F("Y\n", 0o600, 1, 2),
        "cs/deeper": D(0o755, 1, 2),
        "cs/deeper/z.txt": F("Z\n", 0o644, 1, 2),
    }


def test_copy_chown_by_name_through_the_images_own_files(
    ctx: Path, mhome: Path, tmp_path: Path
) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY etc/ /etc/\nCOPY --chown=alice:staff a.txt /home/a\n"
        "COPY --chown=bob b.txt /home/b\nCOPY --chown=alice:1 c.md /home/c\n"
        "COPY --chown=0:bobs exec.sh /home/e\nCOPY --link --chown=bob a.txt /lnk/l\n",
    )
    assert b.tree == {
        "etc": D(),
        "etc/passwd": F(PASSWD),
        "etc/group": F(GROUP),
        "home": D(0o755, 1500, 1650),
        "home/a": F("A\n", 0o644, 1500, 1650),
        "home/b": F("B\n", 0o644, 1501, 1700),
        "home/c": F("C\n", 0o644, 1500, 1),
        "home/e": F("#!/bin/sh\necho hi\n", 0o755, 0, 1700),
        "lnk": D(0o755, 1501, 1700),
        "lnk/l": F("A\n", 0o644, 1501, 1700),
    }


def test_copy_chown_unknown_user_is_an_error(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    line, df = fail(
        ctx, mhome, tmp_path, "FROM scratch\nCOPY etc/ /etc/\nCOPY --chown=mallory a.txt /\n"
    )
    assert f"{df}:3:" in line and "mallory" in line


def test_copy_chmod(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY --chmod=0640 a.txt /m1\nCOPY --chmod=750 dir/sub /cd/\n"
        "COPY --chmod=4711 exec.sh /su\n",
    )
    # --chmod applies to every copied file and directory, the destination directory of a
    # directory source included (BuildKit since moby/buildkit#4945), not to a symlink.
    assert b.tree == {
        "m1": F("A\n", 0o640),
        "cd": D(0o750),
        "cd/y.txt": F("Y\n", 0o750),
        "cd/deeper": D(0o750),
        "cd/deeper/z.txt": F("Z\n", 0o750),
        "su": F("#!/bin/sh\necho hi\n", 0o4711),
    }


def test_copy_symlinks_copied_as_symlinks(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY dir /d\nCOPY toplink /followed\n")
    # links inside a copied directory stay links (even absolute ones); a top-level source
    # that is a symlink is followed, as Docker does
    assert b.tree == {"d": D(), **under("d", DIR_TREE), "followed": F("A\n")}


def test_copy_hardlinks_preserved_within_one_copy(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY hl /h/\nCOPY hl/one /solo\n")
    assert b.tree == {
        "h": D(),
        "h/one": F("same inode\n"),
        "h/two": F("same inode\n"),
        "solo": F("same inode\n"),
    }
    assert inode(b.rootfs / "h/one") == inode(b.rootfs / "h/two")
    assert inode(b.rootfs / "solo") != inode(b.rootfs / "h/one")


def test_copy_keeps_setuid_setgid_sticky(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY suid /bin/suid\nCOPY sticky /t/sticky/\nCOPY . /all/\n",
        unpack=True,
    )
    assert b.tree["bin/suid"] == F(b"\x7fELF-ish", 0o4755)
    assert b.tree["all/suid"] == F(b"\x7fELF-ish", 0o4755)
    assert b.tree["all/sticky"] == D(0o1777)
    assert b.tree["all/sgid"] == D(0o2755)
    assert b.tree["t/sticky"] == D()


def test_copy_link_layer_independent_of_earlier_steps(ctx: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    one = build(
        ctx,
        home,
        tmp_path / "w",
        "FROM scratch\nCOPY a.txt /first\nCOPY --link dir/sub /l/\n",
        "--progress",
        "json",
    )
    two = build(
        ctx,
        home,
        tmp_path / "w",
        "FROM scratch\nCOPY b.txt /first\nCOPY --link dir/sub /l/\n",
        "--progress",
        "json",
    )
    d1, d2 = one.config["rootfs"]["diff_ids"], two.config["rootfs"]["diff_ids"]
    assert len(d1) == len(d2) == 2
    assert d1[0] != d2[0] and d1[1] == d2[1]
    assert two.tree == {
        "first": F("B\n"),
        "l": D(),
        "l/y.txt": F("Y\n", 0o600),
        "l/deeper": D(),
        "l/deeper/z.txt": F("Z\n"),
    }
    events = [json.loads(x) for x in two.stdout.splitlines()]
    done = {e["name"]: e["cached"] for e in events if e["event"] == "step_done"}
    link = [v for k, v in done.items() if "--link" in k]
    first = [v for k, v in done.items() if "/first" in k]
    assert link == [True] and first == [False]


def test_copy_link_into_existing_dir(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY a.txt /etc/\nCOPY --link b.txt /etc/\n")
    assert b.tree == {"etc": D(), "etc/a.txt": F("A\n"), "etc/b.txt": F("B\n")}


# --- .dockerignore ---------------------------------------------------------------------------


def _ignore_ctx(root: Path) -> Path:
    write_files(
        root,
        {
            "keep.txt": "k\n",
            "debug.log": "l\n",
            "src/app.py": "py\n",
            "src/app.log": "l\n",
            "src/deep/er/trace.log": "l\n",
            "src/deep/er/mod.py": "m\n",
            "secret/key": "s\n",
            "secret/keep.txt": "sk\n",
            "tmpfile": "t\n",
            "tmpdir/x": "t\n",
            "docs/a.md": "a\n",
            "docs/b.md": "b\n",
        },
    )
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return root


def test_dockerignore_patterns(tmp_path: Path, home: Path) -> None:
    root = _ignore_ctx(tmp_path / "c")
    (root / ".dockerignore").write_text(
        "# comment\n**/*.log\nsecret\n!secret/keep.txt\ntmp*\ndocs/*.md\n!docs/b.md\n"
        "Dockerfile\n.dockerignore\n"
    )
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /c/\n")
    b = build(root, home, tmp_path / "w")
    assert b.tree == {
        "c": D(),
        "c/keep.txt": F("k\n"),
        "c/src": D(),
        "c/src/app.py": F("py\n"),
        "c/src/deep": D(),
        "c/src/deep/er": D(),
        "c/src/deep/er/mod.py": F("m\n"),
        "c/secret": D(),
        "c/secret/keep.txt": F("sk\n"),
        "c/docs": D(),
        "c/docs/b.md": F("b\n"),
    }


def test_dockerfile_specific_ignore_file_wins(tmp_path: Path, home: Path) -> None:
    root = _ignore_ctx(tmp_path / "c")
    (root / ".dockerignore").write_text("src\n")
    (root / "build").mkdir()
    (root / "build/app.Dockerfile").write_text("FROM scratch\nCOPY src /s/\n")
    (root / "build/app.Dockerfile.dockerignore").write_text("**/*.py\n")
    out = tmp_path / "out"
    lbuild(
        "build",
        root,
        "-f",
        root / "build/app.Dockerfile",
        "--output",
        f"type=oci,dest={out}",
        home=home,
    )
    validate_layout(out)
    t = tree(umoci_unpack(out, tmp_path / "bundle"))
    assert t == {
        "s": D(),
        "s/app.log": F("l\n"),
        "s/deep": D(),
        "s/deep/er": D(),
        "s/deep/er/trace.log": F("l\n"),
    }


def test_copy_ignored_source_is_not_found(tmp_path: Path, home: Path) -> None:
    root = _ignore_ctx(tmp_path / "c")
    (root / ".dockerignore").write_text("secret\n")
    line, df = fail(root, home, tmp_path / "w", "FROM scratch\nCOPY secret/key /k\n")
    assert f"{df}:2:" in line and "secret/key" in line


# --- ADD -------------------------------------------------------------------------------------


def _make_archive(path: Path, codec: str) -> None:
    """A tar with a dir, a file with odd owner and mode, a symlink, a hardlink, an executable;
    compressed with ``codec`` (gz, bz2, xz or '' for none) by the standard library."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(
            name: str,
            kind: bytes,
            data: bytes = b"",
            perm: int = 0o644,
            uid: int = 0,
            gid: int = 0,
            link: str = "",
        ) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, perm, uid, gid, 1_000_000
            ti.linkname = link
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("pkg", tarfile.DIRTYPE, perm=0o750)
        add("pkg/data.txt", tarfile.REGTYPE, b"data\n", 0o640, 1234, 5678)
        add("pkg/run", tarfile.REGTYPE, b"#!/bin/sh\n", 0o755)
        add("pkg/ln", tarfile.SYMTYPE, link="data.txt")
        add("pkg/hard", tarfile.LNKTYPE, link="pkg/data.txt", perm=0o640, uid=1234, gid=5678)
        add("top.txt", tarfile.REGTYPE, b"top\n")
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "": bytes,
        "gz": gzip.compress,
        "bz2": bz2.compress,
        "xz": lzma.compress,
    }
    compress = compressors[codec]
    path.write_bytes(compress(buf.getvalue()))


ARCHIVE_TREE: Tree = {
    "pkg": D(0o750),
    "pkg/data.txt": F("data\n", 0o640, 1234, 5678),
    "pkg/run": F("#!/bin/sh\n", 0o755),
    "pkg/ln": L("data.txt"),
    "pkg/hard": F("data\n", 0o640, 1234, 5678),
    "top.txt": F("top\n"),
}


@pytest.mark.parametrize(
    "name,codec",
    [("a.tar", ""), ("a.tar.gz", "gz"), ("a.tgz", "gz"), ("a.tar.bz2", "bz2"), ("a.tar.xz", "xz")],
)
def test_add_local_archive_is_extracted(tmp_path: Path, mhome: Path, name: str, codec: str) -> None:
    root = tmp_path / "c"
    root.mkdir()
    _make_archive(root / name, codec)
    b = build(root, mhome, tmp_path / "w", f"FROM scratch\nADD {name} /x/\nADD {name} /\n")
    assert b.tree == {"x": D(), **under("x", ARCHIVE_TREE), **ARCHIVE_TREE}
    assert inode(b.rootfs / "x/pkg/hard") == inode(b.rootfs / "x/pkg/data.txt")
    # members keep the archive's own times (they are in the archive's bytes, hence the key)
    assert (b.rootfs / "x/pkg/data.txt").stat().st_mtime == 1_000_000


def test_add_archive_with_chown_and_copy_from_keeps_hardlinks(tmp_path: Path, mhome: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    _make_archive(root / "a.tar", "")
    b = build(
        root,
        mhome,
        tmp_path / "w",
        "FROM scratch AS src\nADD --chown=9:9 a.tar /x/\n"
        "FROM scratch\nCOPY --from=src /x/pkg /p/\nCOPY --from=src /x/pkg/hard /alone\n",
    )
    assert b.tree == {
        "p": D(),
        "p/data.txt": F("data\n", 0o640, 9, 9),
        "p/run": F("#!/bin/sh\n", 0o755, 9, 9),
        "p/ln": L("data.txt", 9, 9),
        "p/hard": F("data\n", 0o640, 9, 9),
        "alone": F("data\n", 0o640, 9, 9),
    }
    assert inode(b.rootfs / "p/hard") == inode(b.rootfs / "p/data.txt")


def test_add_non_archive_copied_as_is(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nADD a.txt /a\nADD plain.tar.gz /p/\nADD --chmod=600 dir/x.txt /x\n",
    )
    assert b.tree == {
        "a": F("A\n"),
        "p": D(),
        "p/plain.tar.gz": F("not really an archive\n"),
        "x": F("X\n", 0o600),
    }


def test_add_url_is_not_supported(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    line, df = fail(
        ctx, mhome, tmp_path, "FROM scratch\nCOPY a.txt /\nADD https://example.com/x.tar.gz /x/\n"
    )
    assert f"{df}:3:" in line and "not supported" in line


def test_copy_mtime_is_source_date_epoch(ctx: Path, mhome: Path, tmp_path: Path) -> None:
    b = build(
        ctx,
        mhome,
        tmp_path,
        "FROM scratch\nCOPY dir/sub /s/\n",
        env={"SOURCE_DATE_EPOCH": "1700000000"},
    )
    assert {(b.rootfs / p).lstat().st_mtime for p in b.tree} == {1_700_000_000}
    c = build(ctx, mhome, tmp_path, "FROM scratch\nCOPY dir/sub /s/\n")
    assert {(c.rootfs / p).lstat().st_mtime for p in c.tree} == {0}


def test_copy_keep_mtime(tmp_path: Path, home: Path) -> None:
    root = tmp_path / "c"
    write_files(root, {"f": "f\n"})
    os.utime(root / "f", (1_600_000_000, 1_600_000_000))
    b = build(root, home, tmp_path / "w", "FROM scratch\nCOPY f /f\n", "--keep-mtime")
    assert (b.rootfs / "f").stat().st_mtime == 1_600_000_000
    os.utime(root / "f", (1_600_000_100, 1_600_000_100))
    c = build(root, home, tmp_path / "w", "FROM scratch\nCOPY f /f\n", "--keep-mtime")
    assert (c.rootfs / "f").stat().st_mtime == 1_600_000_100
    assert b.digest != c.digest


@pytest.mark.parametrize(
    "dockerfile,where",
    [
        ("FROM scratch\nCOPY a.txt /x\nCOPY a.txt /x/\n", "/x"),
        ("FROM scratch\nCOPY a.txt /x/y\nCOPY b.txt /x/y/z\n", "/x/y"),
        ("FROM scratch\nCOPY a.txt /x\nCOPY dir /x\n", "/x"),
        ("FROM scratch\nCOPY a.txt /x\nCOPY sticky /x\n", "/x"),
    ],
)
def test_copy_below_a_file_is_an_error(
    ctx: Path, mhome: Path, tmp_path: Path, dockerfile: str, where: str
) -> None:
    """Docker refuses; a layer with entries below a file is one umoci cannot unpack."""
    line, df = fail(ctx, mhome, tmp_path, dockerfile)
    assert f"{df}:3:" in line and f"{where} is not a directory" in line
