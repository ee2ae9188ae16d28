"""COPY <<EOF: inline files, expanded unless the marker is quoted, into files or a directory."""

from __future__ import annotations

from pathlib import Path

from util import lbuild, tree, umoci_unpack, validate_layout


def test_copy_heredocs_become_files(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM scratch\n"
        "ARG NAME=world\n"
        "COPY <<EOF /greeting.txt\nhello ${NAME}\nEOF\n"
        "COPY <<'RAW' /raw.txt\nkeep ${NAME}\nRAW\n"
        "COPY --chmod=0755 <<A <<B /etc/\nfirst\nA\nsecond\nB\n"
    )
    out = tmp_path / "out"
    lbuild("build", ctx, "--output", f"type=oci,dest={out}", "--build-arg", "NAME=lbuild", home=home)
    validate_layout(out)
    rootfs = umoci_unpack(out, tmp_path / "bundle")
    t = tree(rootfs)
    assert (rootfs / "greeting.txt").read_text() == "hello lbuild\n"
    assert (rootfs / "raw.txt").read_text() == "keep ${NAME}\n"
    assert (rootfs / "etc/A").read_text() == "first\n" and (rootfs / "etc/B").read_text() == "second\n"
    assert t["greeting.txt"][:4] == ("file", 0o644, 0, 0)
    assert t["etc/A"][:2] == ("file", 0o755) and t["etc/B"][:2] == ("file", 0o755)
    assert set(t) == {"greeting.txt", "raw.txt", "etc", "etc/A", "etc/B"}


def test_copy_heredoc_content_is_in_the_key(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    df = ctx / "Dockerfile"
    df.write_text("FROM scratch\nCOPY <<EOF /a.txt\none\nEOF\n")
    out = tmp_path / "out"
    lbuild("build", ctx, "--output", f"type=oci,dest={out}", home=home)
    df.write_text("FROM scratch\nCOPY <<EOF /a.txt\ntwo\nEOF\n")
    lbuild("build", ctx, "--output", f"type=oci,dest={out}", home=home)
    rootfs = umoci_unpack(out, tmp_path / "bundle")
    assert (rootfs / "a.txt").read_text() == "two\n"
