"""Docker-build habits on the real command line (issue 15 item 1), each in a subprocess:
-q, --iidfile, --metadata-file, --label, --annotation, --version, Containerfile, ``-f -``,
no abbreviations, docker flags lbuild lacks, "did you mean", plan/why flags, plan --exit-code,
and the ``error`` event that ends a failed ``--progress json`` build."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.util import lbuild, manifest_digest, write_files

FILES: dict[str, str | bytes] = {
    "Dockerfile": "FROM scratch AS build\nCOPY a.txt /a.txt\nLABEL from.file=1\nENV E=1\n",
    "a.txt": "a\n",
}


def ctx(tmp_path: Path, files: dict[str, str | bytes] = FILES, name: str = "ctx") -> Path:
    root = tmp_path / name
    write_files(root, files)
    return root


def blob(layout: Path, digest: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((layout / "blobs/sha256" / digest.split(":")[1]).read_text())
    return data


def image_config(layout: Path, tag: str = "latest") -> dict[str, Any]:
    return blob(layout, blob(layout, manifest_digest(layout, tag))["config"]["digest"])


def events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_version() -> None:
    for cmd in (["-m", "lbuild"], ["-m", "builder"]):
        p = subprocess.run([sys.executable, *cmd, "--version"], capture_output=True, text=True,
                           cwd="/")
        assert p.returncode == 0, p.stderr
        name, version = p.stdout.split()
        assert name == "lbuild" and version[0].isdigit()


def test_quiet_iidfile_and_metadata_file(tmp_path: Path, home: Path) -> None:
    c, out = ctx(tmp_path), tmp_path / "oci"
    iid, meta = tmp_path / "iid", tmp_path / "meta.json"
    args = ["build", c, "-q", "--iidfile", iid, "--metadata-file", meta, "-t", "app:1",
            "-o", f"type=oci,dest={out}"]
    p = lbuild(*args, home=home)
    m = json.loads(meta.read_text())
    config = blob(out, manifest_digest(out, "1"))["config"]["digest"]
    assert p.stdout == config + "\n" and p.stderr == ""  # only the image ID, as docker -q
    assert iid.read_text() == config
    assert m["containerimage.digest"] == manifest_digest(out, "1")
    assert m["containerimage.config.digest"] == config
    assert m["lbuild.steps"] == {"total": 3, "cached": 0, "built": 3}
    assert m["image.name"] == "app:1"
    # the no-op path answers the same
    iid.unlink()
    p = lbuild(*args, home=home)
    assert p.stdout == config + "\n" and iid.read_text() == config
    assert json.loads(meta.read_text())["lbuild.steps"] == {"total": 3, "cached": 3, "built": 0}


def test_label_and_annotation(tmp_path: Path, home: Path) -> None:
    c, out = ctx(tmp_path), tmp_path / "oci"
    lbuild("build", c, "--label", "org.example.team=core", "--label", "from.file=cli",
           "--annotation", "org.opencontainers.image.source=here",
           "--annotation", "manifest:k=v", "-o", f"type=oci,dest={out}", home=home)
    labels = image_config(out)["config"]["Labels"]
    assert labels == {"from.file": "cli", "org.example.team": "core"}  # the flag wins
    manifest = blob(out, manifest_digest(out))
    assert manifest["annotations"] == {"k": "v", "org.opencontainers.image.source": "here"}
    # another label is another image, also on the no-op path
    lbuild("build", c, "--label", "org.example.team=web", "-o", f"type=oci,dest={out}",
           home=home)
    assert image_config(out)["config"]["Labels"]["org.example.team"] == "web"
    p = lbuild("build", c, "--annotation", "index:k=v", home=home, check=False)
    assert p.returncode == 2 and "not supported yet" in p.stderr


def test_containerfile_is_the_default_when_there_is_no_dockerfile(
    tmp_path: Path, home: Path
) -> None:
    c = ctx(tmp_path, {"Containerfile": "FROM scratch\nCOPY c.txt /c\n", "c.txt": "c\n"})
    out = tmp_path / "oci"
    lbuild("build", c, "-o", f"type=oci,dest={out}", home=home)
    assert len(image_config(out)["rootfs"]["diff_ids"]) == 1
    (c / "Dockerfile").write_text("FROM scratch\n")  # with both, Dockerfile wins
    lbuild("build", c, "-o", f"type=oci,dest={out}", home=home)
    assert image_config(out)["rootfs"]["diff_ids"] == []


def test_dockerfile_from_stdin(tmp_path: Path, home: Path) -> None:
    c, out, tmp = ctx(tmp_path), tmp_path / "oci", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, LBUILD_HOME=str(home), TMPDIR=str(tmp))
    p = subprocess.run(
        [sys.executable, "-m", "builder", "build", "-f", "-", str(c), "-o",
         f"type=oci,dest={out}", "--progress", "plain"],
        input="FROM scratch\nCOPY a.txt /from-stdin\n", capture_output=True, text=True,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    assert "COPY a.txt /from-stdin" in p.stderr
    assert list(tmp.iterdir()) == []  # the Dockerfile's temporary copy is gone


def _stdin(tmp_path: Path, home: Path, df: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LBUILD_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "builder", *args], input=df,
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize(("command", "df", "message"), [
    ("build", "FROM scratch\nCOPY a.txt /a\nCOPY --bogus=1 a.txt /b\n",
     "-:3: unknown flag for COPY: --bogus"),
    ("plan", "FROM scratch\n\nCOPPY a.txt /a\n",
     "-:3: unknown instruction: COPPY (did you mean COPY?)"),
    ("why", "FROM scratch AS base\nFROM base\nCOPY missing.txt /a\n",
     "-:3: COPY source not found: missing.txt"),
    ("build", "FROM scratch\nCOPY a.txt\n",
     "-:2: COPY requires at least two arguments, but only one was provided. "
     "Destination could not be determined"),
])
def test_stdin_dockerfile_errors_name_it_dash(
    tmp_path: Path, home: Path, command: str, df: str, message: str
) -> None:
    """``-f -``: every message names the Dockerfile ``-``, never its temporary copy."""
    c = ctx(tmp_path)
    p = _stdin(tmp_path, home, df, command, "-f", "-", str(c))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"lbuild: error: {message}"
    assert "lbuild-stdin" not in p.stdout + p.stderr


def test_repro_check_refuses_a_dockerfile_from_stdin(tmp_path: Path, home: Path) -> None:
    p = _stdin(tmp_path, home, "FROM scratch\n", "repro-check", "-f", "-", str(ctx(tmp_path)))
    assert p.returncode == 2
    assert p.stderr.strip() == (
        "lbuild: error: repro-check -f - (the Dockerfile from stdin) is not supported yet")


def test_stdin_dockerfile_json_error_and_why(tmp_path: Path, home: Path) -> None:
    c = ctx(tmp_path)
    p = _stdin(tmp_path, home, "FROM scratch\nCOPY nope /n\n",
               "build", "-f", "-", str(c), "--progress", "json")
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert (last["event"], last["file"], last["line"]) == ("error", "-", 2), p.stdout
    assert "lbuild-stdin" not in p.stdout + p.stderr
    df = "FROM scratch\nCOPY a.txt /a\n"
    for _ in range(2):
        assert _stdin(tmp_path, home, df, "build", "-f", "-", str(c)).returncode == 0
    # one no-op memo for the two: its key does not name the temporary file
    assert len(list((home / "memo").iterdir())) == 1
    (c / "a.txt").write_text("changed\n")
    # the same Dockerfile from stdin again is "the same Dockerfile" for why
    p = _stdin(tmp_path, home, df, "why", "-f", "-", str(c))
    assert "a.txt content changed" in p.stdout, p.stdout + p.stderr


def _usage_error(p: subprocess.CompletedProcess[str], command: str, message: str) -> None:
    assert p.returncode == 2
    assert p.stderr.startswith(f"usage: lbuild {command} ")
    assert p.stderr.rstrip().splitlines()[-1] == message
    assert "Traceback" not in p.stderr


def test_no_abbreviations(tmp_path: Path, home: Path) -> None:
    p = lbuild("build", "--prog", "plain", ctx(tmp_path), home=home, check=False)
    _usage_error(p, "build", "lbuild build: unknown option --prog (did you mean --progress?)")


@pytest.mark.parametrize("flag", [["--platform", "linux/arm64"], ["--ssh=default"],
                                  ["-m", "1g"], ["--squash"], ["--add-host", "a:1.2.3.4"]])
def test_docker_build_flags_lbuild_lacks(tmp_path: Path, home: Path, flag: list[str]) -> None:
    p = lbuild("build", *flag, ctx(tmp_path), home=home, check=False)
    name = flag[0].split("=")[0]
    _usage_error(p, "build", f"lbuild build: {name} is not supported yet")


def test_unknown_arguments_get_the_subcommands_usage(tmp_path: Path, home: Path) -> None:
    p = lbuild("build", ctx(tmp_path), "extra", home=home, check=False)
    _usage_error(p, "build", "lbuild build: unrecognized arguments: extra")
    p = lbuild("cache", "du", "--zzz", home=home, check=False)
    _usage_error(p, "cache du", "lbuild cache du: unknown option --zzz")


def test_did_you_mean(tmp_path: Path, home: Path) -> None:
    p = lbuild("buidl", ".", home=home, check=False)
    assert p.returncode == 2
    assert p.stderr.rstrip().endswith("lbuild: unknown command 'buidl' (did you mean build?)")
    p = lbuild("cache", "lss", home=home, check=False)
    assert p.returncode == 2 and "(did you mean ls?)" in p.stderr
    c = ctx(tmp_path)
    p = lbuild("build", c, "--target", "biuld", home=home, check=False)
    assert p.returncode == 2
    assert "target stage 'biuld' could not be found (did you mean 'build'?)" in p.stderr
    (c / "Dockerfile").write_text("FROM scratch\nCOPPY a.txt /a\n")
    p = lbuild("build", c, home=home, check=False)
    assert p.returncode == 2
    assert f"{c / 'Dockerfile'}:2: unknown instruction: COPPY (did you mean COPY?)" in p.stderr


def test_plan_and_why_take_only_their_flags(tmp_path: Path, home: Path) -> None:
    c = ctx(tmp_path)
    for cmd, flag in (("plan", ["-t", "x"]), ("why", ["--jobs", "2"]),
                      ("plan", ["--compression", "zstd"]), ("why", ["-q"])):
        p = lbuild(cmd, *flag, c, home=home, check=False)
        _usage_error(p, cmd, f"lbuild {cmd}: {flag[0]} does not apply to {cmd}")
    p = lbuild("plan", "--platform", "linux/amd64", c, home=home, check=False)
    _usage_error(p, "plan", "lbuild plan: --platform is not supported yet")


def _state(home: Path) -> tuple[object, ...]:
    """What a build writes: blobs, step records, tags, memos, snapshots."""
    with sqlite3.connect(home / "lbuild.db") as db:
        steps = db.execute("SELECT key, last_used, hits FROM steps ORDER BY key").fetchall()
        tags = db.execute("SELECT name, manifest_digest FROM tags ORDER BY name").fetchall()
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                   if p.parts[len(home.parts)] in ("blobs", "memo", "snapshots"))
    return steps, tags, files


def test_plan_exit_code_and_plan_writes_nothing(tmp_path: Path, home: Path) -> None:
    c = ctx(tmp_path)
    lbuild("build", c, "-t", "app:1", home=home)
    before = _state(home)
    p = lbuild("plan", "--exit-code", c, home=home, check=False)
    assert p.returncode == 0 and "MISS" not in p.stdout
    (c / "a.txt").write_text("changed\n")
    p = lbuild("plan", "--exit-code", c, home=home, check=False)
    assert p.returncode == 1 and p.stdout.count("MISS") == 3
    lbuild("why", c, home=home)
    assert _state(home) == before  # no blob, record, hit count, tag, memo or snapshot


def test_failed_json_build_ends_with_one_error_event(tmp_path: Path, home: Path) -> None:
    c = ctx(tmp_path, {"Dockerfile": "FROM scratch\nCOPY a.txt /a\nCOPY missing /m\n",
                       "a.txt": "a\n"})
    p = lbuild("build", c, "--progress", "json", home=home, check=False)
    assert p.returncode == 2
    evs = events(p.stdout)
    assert [e["event"] for e in evs].count("error") == 1 and evs[-1]["event"] == "error"
    last = evs[-1]
    assert last["exit_code"] == 2 and last["line"] == 3
    assert last["file"] == str(c / "Dockerfile")
    assert last["message"] == "COPY source not found: missing"
    assert not any(e["event"] == "done" for e in evs)
    bad = events(lbuild("build", c, "--progress", "json", "--build-arg", "=x", home=home,
                        check=False).stdout)  # a bad flag value: the stream still says why
    assert [e["event"] for e in bad] == ["error"] and bad[0]["exit_code"] == 2
    (c / "missing").write_text("m\n")
    ok = events(lbuild("build", c, "--progress", "json", home=home).stdout)
    assert ok[-1]["event"] == "done" and not any(e["event"] == "error" for e in ok)


def test_a_long_copy_and_compression_show_byte_counters(tmp_path: Path, home: Path) -> None:
    c = ctx(tmp_path, {"Dockerfile": "FROM scratch\nCOPY big /big\n",
                       "big": os.urandom(9 << 20)})
    archive = tmp_path / "image.tar"
    evs = events(lbuild("build", c, "--progress", "json", "-o", f"type=docker,dest={archive}",
                        home=home).stdout)
    for kind in ("compress", "export"):  # export: the uncompressed layer into the archive
        counts = [e for e in evs if e["event"] == kind]
        assert len(counts) >= 2, kind  # on the way, and at the end
        done = [int(str(e["done"])) for e in counts]
        assert done == sorted(done) and done[-1] == counts[-1]["total"] > 9 << 20
    # the COPY writing the layer counts the file's bytes, on its step (a few events, not one
    # per file or per read)
    copies = [e for e in evs if e["event"] == "copy"]
    assert [(e["id"], e["total"]) for e in copies] == [("0:0", 9 << 20)] * len(copies)
    assert 2 <= len(copies) <= 65 and copies[-1]["done"] == 9 << 20
    assert copies[0]["done"] < 9 << 20
    assert evs[-1]["event"] == "done" and archive.stat().st_size > 9 << 20
