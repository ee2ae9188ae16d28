"""The live progress view on a pseudo-terminal (issue 15 item 2): the running step's timer
ticks and its spinner turns while a RUN is silent, RUN output is prefixed with the short step
id, an interrupted step is shown as interrupted, and no live line is left behind.  A no-op
rebuild on a terminal does not import rich."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import run_fixtures
from run_fixtures import BUSYBOX, needs_root
from util import ROOT, lbuild, write_files, write_memo_ready

busybox_home = run_fixtures.busybox_home
bbhome = run_fixtures.bbhome

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's default "dots" spinner


class Pty:
    """``lbuild ARGS`` with stdin, stdout and stderr on a 120x40 pseudo-terminal."""

    def __init__(self, args: list[str], home: Path, extra: list[str] | None = None) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        env = dict(os.environ, LBUILD_HOME=str(home), TERM="xterm-256color", COLUMNS="120")
        env.pop("SOURCE_DATE_EPOCH", None)
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, *(extra or []), "-m", "builder", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.raw = b""
        self.grew = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the other side closed
                data = b""
            with self.grew:
                if not data:
                    self.grew.notify_all()
                    return
                self.raw += data
                self.grew.notify_all()

    def wait_for(self, text: str, limit_s: float = 120) -> None:
        """Until ``text`` has been shown (the limit only guards against a hang)."""
        with self.grew:
            ok = self.grew.wait_for(lambda: text in self.text() or not self.reader.is_alive(),
                                    timeout=limit_s)
        assert ok and text in self.text(), self.text()[-2000:]

    def finish(self) -> int:
        code = self.proc.wait(timeout=300)
        self.reader.join(timeout=60)
        os.close(self.master)
        return code

    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))


def _ctx(tmp_path: Path, dockerfile: str) -> Path:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": dockerfile})
    return ctx


@needs_root
@pytest.mark.slow
def test_live_view_ticks_while_a_run_is_silent(tmp_path: Path, bbhome: Path) -> None:
    step = "RUN sleep 2 && echo slept"
    ctx = _ctx(tmp_path, f"FROM {BUSYBOX}\n{step}\n")
    t = Pty(["build", str(ctx)], bbhome)
    assert t.finish() == 0, t.text()
    text = t.text()
    timers = set(re.findall(re.escape(step) + r"\s+(\d+\.\d)s", text))
    assert len(timers) >= 3, timers  # the timer moved while the step printed nothing
    spun = {c for c in text if c in SPINNER}
    assert len(spun) >= 2, spun
    lines = text.replace("\r", "\n").splitlines()
    assert "[stage-0 1/1] | slept" in lines  # output under the short step id
    assert any(line.startswith(f"[stage-0 1/1] {step} DONE ") for line in lines)
    # the live region is erased before the summary, and nothing live is drawn after it
    raw = t.raw.decode(errors="replace")
    summary = raw.index("steps cached")
    assert raw.rfind("\x1b[2K", 0, summary) != -1
    assert step not in ANSI.sub("", raw[summary:])
    assert text.rstrip().splitlines()[-1].startswith("image sha256:")


@needs_root
@pytest.mark.slow
def test_an_interrupted_step_is_shown_interrupted(tmp_path: Path, bbhome: Path) -> None:
    step = "RUN echo started && sleep 60"
    ctx = _ctx(tmp_path, f"FROM {BUSYBOX}\n{step}\n")
    t = Pty(["build", str(ctx)], bbhome)
    t.wait_for("[stage-0 1/1] | started")
    os.killpg(t.proc.pid, signal.SIGINT)
    assert t.finish() == 130
    lines = [x for x in t.text().replace("\r", "\n").splitlines() if x.strip()]
    assert any(x.startswith(f"[stage-0 1/1] {step} INTERRUPTED ") for x in lines), lines
    assert lines[-1] == "lbuild: interrupted"
    after = t.text()[t.text().index("INTERRUPTED"):]
    assert not re.search(re.escape(step) + r"\s+\d+\.\ds", after)  # no live line redrawn


def test_a_long_copy_shows_a_byte_counter_on_its_line(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    write_files(ctx, {"Dockerfile": "FROM scratch\nCOPY big /big\n", "big": os.urandom(20 << 20)})
    t = Pty(["build", str(ctx)], home)
    assert t.finish() == 0, t.text()
    shown = re.findall(r"COPY big /big\s+(\d+\.\d) MiB/20\.0 MiB", t.text())
    # the first count is drawn when it comes (8 MiB of the 20 written), before the copy ends
    assert "8.0" in shown, t.text()[-2000:]
    assert any(line.startswith("[stage-0 1/1] COPY big /big DONE ")
               for line in t.text().replace("\r", "\n").splitlines())


def test_a_no_op_rebuild_on_a_terminal_does_not_import_rich(tmp_path: Path, home: Path) -> None:
    ctx = tmp_path / "ctx"
    # so that the builds below write a memo the last can use
    write_memo_ready(ctx, {"Dockerfile": "FROM scratch\nCOPY a /a\n", "a": "a\n"})
    first = Pty(["build", str(ctx)], home, ["-X", "importtime"])
    assert first.finish() == 0
    assert re.search(r"\|\s+rich\.live\b", first.text())  # a build does show the live view
    # the first build's memo cannot vouch for files changed (ctime) while it ran: the second
    # one writes a memo the third can use
    lbuild("build", ctx, "--progress", "plain", home=home)
    again = Pty(["build", str(ctx)], home, ["-X", "importtime"])
    assert again.finish() == 0
    text = again.text()
    assert "1/1 steps cached" in text
    assert not re.search(r"\|\s+rich\b", text)
