"""``lbuild repro-check``: build N times under varied conditions and compare the images.

Every build is a ``lbuild build`` subprocess with a throwaway home of its own (no shared
cache) writing an OCI layout.  Run 0 is the baseline: the context where it is, the caller's
environment.  Every later run changes what its variations say (``VARIATIONS``):

=========== ================================================================================
path        the context is copied to another directory (another depth and name)
umask       the copy is checked out under umask 0002 / 0027 (file modes 0664 / 0640) and the
            build runs under that umask
mtime       the copy's files and directories get other mtimes
order       the copy is created in reverse (or shuffled) order on a tmpfs (/dev/shm) when
            there is one, and the build's home lives there too: directory read order differs
            (ext4 returns hash order, tmpfs creation order)
tz          TZ=Pacific/Kiritimati / America/Adak
locale      LANG and LC_ALL = C / POSIX instead of the caller's
home        HOME is another (empty) directory
hostname    the hostname RUN sees (``LBUILD_RUN_HOSTNAME``) is repro-N instead of ``lbuild``
jobs        ``--jobs 1`` instead of the default parallelism
snapshotter ``--snapshotter copy`` instead of the automatic choice (overlay where possible)
clock       every RUN step of run N starts >= 2 s after the same step of run N-1 (wall
            clock): the builds run together and ``builder/solve/clockgate.py`` holds each RUN
            step of a later run back until its turn
=========== ================================================================================

The builds start together (run N as soon as its context copy is made, which overlaps the
builds already started).

Local base images (``FROM NAME`` where NAME is a tag in the caller's home) are exported once
as OCI layouts and given to every build as ``--build-context NAME=oci-layout://...``.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from builder.compare.diff import DiffOptions, DiffResult, FieldDiff, diff_images
from builder.compare.source import Image, LocalResolver, open_image
from cache.errors import InvalidInput, StepFailed

if TYPE_CHECKING:
    from builder.frontend.dockerfile import Dockerfile

__all__ = ["VARIATIONS", "ReproReport", "ReproSpec", "StepSite", "parse_variations", "repro_check"]

VARIATIONS = (
    "path",
    "umask",
    "mtime",
    "order",
    "tz",
    "locale",
    "home",
    "hostname",
    "jobs",
    "snapshotter",
    "clock",
)
CLOCK_GAP_S = 2.0
HOSTNAME_ENV = "LBUILD_RUN_HOSTNAME"
_TMPFS = Path("/dev/shm")


def parse_variations(text: str | None) -> tuple[str, ...]:
    """``--variations``: ``all`` (default), ``none``, a comma list, or ``all,-jobs,-clock``."""
    if text is None or text.strip() in ("", "all"):
        return VARIATIONS
    if text.strip() == "none":
        return ()
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = part.lstrip("+-")
        if name == "all":
            chosen = list(VARIATIONS)
            continue
        if name not in VARIATIONS:
            raise InvalidInput(
                f"--variations: unknown variation {name!r} (known: {', '.join(VARIATIONS)})"
            )
        if part.startswith("-"):
            chosen = [v for v in chosen if v != name]
        elif name not in chosen:
            chosen.append(name)
    return tuple(v for v in VARIATIONS if v in chosen)


@dataclass(frozen=True)
class ReproSpec:
    """What ``lbuild repro-check`` was asked.

    ``build_argv`` are the build flags forwarded to every ``lbuild build`` (never CONTEXT,
    ``--home``, ``--output``, ``--jobs`` or ``--snapshotter``: repro-check sets those);
    ``base_contexts`` maps a FROM name to ``oci-layout://DIR[:TAG]`` already given with
    ``--build-context``.
    """

    context: Path
    dockerfile: Path | None = None
    build_argv: tuple[str, ...] = ()
    runs: int = 2
    variations: tuple[str, ...] = VARIATIONS
    against: str | None = None
    jobs: int = 0
    snapshotter: str | None = None
    target: str | None = None
    base_contexts: dict[str, str] = field(default_factory=dict)
    work: Path | None = None  # keep the builds there (default: a temporary directory)
    options: DiffOptions = field(default_factory=DiffOptions)


@dataclass(frozen=True)
class StepSite:
    """A Dockerfile instruction of the final image's chain of stages."""

    file: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.text}"


@dataclass
class Run:
    index: int
    context: Path
    dockerfile: Path | None
    home: Path
    out: Path
    env: dict[str, str]
    umask: int | None
    flags: list[str]
    used: dict[str, str]
    prepare: Callable[[], None] | None = None  # makes the context copy (just before starting)
    seconds: float = 0.0
    returncode: int | None = None
    log: str = ""


@dataclass
class ReproReport:
    runs: list[Run]
    against: str | None
    diffs: list[tuple[int, DiffResult]]
    steps: list[StepSite]
    work: Path | None  # kept work directory, if any

    @property
    def reproducible(self) -> bool:
        return all(d.equal for _, d in self.diffs)

    def site_of_layer(self, d: DiffResult, layer: int) -> StepSite | None:
        """The Dockerfile instruction that made layer ``layer`` (through the history)."""
        history = d.b.config.get("history") or d.a.config.get("history") or []
        seen = -1
        for j, h in enumerate(history):
            if isinstance(h, dict) and not h.get("empty_layer"):
                seen += 1
                if seen == layer:
                    return self.site_of_history(d, j)
        return None

    def site_of_history(self, d: DiffResult, j: int) -> StepSite | None:
        history = d.b.config.get("history") or d.a.config.get("history") or []
        k = j - (len(history) - len(self.steps))
        if 0 <= k < len(self.steps) and 0 <= j < len(history):
            h = history[j]
            text = h.get("created_by", "") if isinstance(h, dict) else ""
            if text == self.steps[k].text:
                return self.steps[k]
        return None

    def first_step(self, d: DiffResult) -> tuple[str, StepSite | None] | None:
        """What differs first in build order: ('layer N' | 'history[N]', its step)."""
        candidates: list[tuple[int, str, StepSite | None]] = []
        layer = d.first_layer
        if layer is not None:
            site = self.site_of_layer(d, layer)
            pos = self.steps.index(site) if site in self.steps else 10**6 + layer
            candidates.append((pos, f"layer {layer}", site))
        for f in d.config:
            if f.field.startswith("history[") and not f.derived:
                j = int(f.field[len("history[") : f.field.index("]")])
                site = self.site_of_history(d, j)
                pos = self.steps.index(site) if site in self.steps else 10**6 + j
                candidates.append((pos, f"history[{j}]", site))
        for f in d.config:
            if f.field.startswith("config.") and not f.derived:
                site = self.site_of_config(f)
                pos = self.steps.index(site) if site in self.steps else 2 * 10**6
                candidates.append((pos, f.field, site))
        if not candidates:
            return None
        _, what, site = min(candidates, key=lambda c: c[0])
        return what, site

    def site_of_config(self, f: FieldDiff) -> StepSite | None:
        """The last instruction of the chain that sets a differing ``config.*`` field (for Env
        and Labels, one that names the variable or label)."""
        part = f.field[len("config.") :]
        name = re.split(r"[.\[]", part, maxsplit=1)[0]
        words = _CONFIG_WORDS.get(name)
        if words is None:
            return None
        key: str | None = None
        if name == "Env":
            value = f.a if f.a_present else f.b
            key = value.split("=", 1)[0] if isinstance(value, str) else None
        elif name == "Labels" and part.startswith("Labels."):
            key = part[len("Labels.") :]
        for site in reversed(self.steps):
            word = site.text.split(None, 1)[0].upper() if site.text.strip() else ""
            if word in words and (key is None or key in site.text):
                return site
        return None


_CONFIG_WORDS = {
    "Env": ("ENV",),
    "Labels": ("LABEL",),
    "WorkingDir": ("WORKDIR",),
    "User": ("USER",),
    "Cmd": ("CMD",),
    "Entrypoint": ("ENTRYPOINT",),
    "ExposedPorts": ("EXPOSE",),
    "Volumes": ("VOLUME",),
    "StopSignal": ("STOPSIGNAL",),
    "Healthcheck": ("HEALTHCHECK",),
    "Shell": ("SHELL",),
}


# ---------------------------------------------------------------------------------------------
# Dockerfile steps


def _parsed(path: Path) -> Dockerfile:
    """The Dockerfile at ``path``, parsed once per content (steps and bases both read it)."""
    from builder.frontend.dockerfile import load

    try:
        st = path.stat()
    except OSError:
        return load(path)  # its own message (not found, a directory, unreadable)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if _PARSED.get(key) is None:
        _PARSED.clear()
        _PARSED[key] = load(path)
    return _PARSED[key]


_PARSED: dict[tuple[str, int, int], Dockerfile] = {}


def chain_steps(context: Path, dockerfile: Path | None, target: str | None) -> list[StepSite]:
    """The instructions of the final image's stage chain, in history order."""
    path = dockerfile if dockerfile is not None else context / "Dockerfile"
    df = _parsed(path)
    if not df.stages:
        return []
    stage = df.stage(target) if target else df.stages[-1]
    if stage is None:
        return []
    chain = []
    seen: set[int] = set()
    while stage is not None and stage.index not in seen:
        seen.add(stage.index)
        chain.append(stage)
        base = df.stage(stage.base.image)
        stage = base if base is not None and base.index < stage.index else None
    shown = str(path)  # as the user named it
    out = []
    for st in reversed(chain):
        for instr in st.instructions:
            out.append(StepSite(shown, instr.line, instr.original.split("\n", 1)[0].strip()))
    return out


def external_bases(context: Path, dockerfile: Path | None) -> list[str]:
    """FROM and COPY --from names that are not stages (nor scratch, nor ARG-expanded)."""
    df = _parsed(dockerfile if dockerfile is not None else context / "Dockerfile")
    names: list[str] = []
    for st in df.stages:
        refs = [st.base.image]
        refs += [getattr(i, "from_", None) or "" for i in st.instructions]
        for ref in refs:
            if not ref or "$" in ref or ref.lower() == "scratch":
                continue
            s = df.stage(ref)
            if s is not None and s.index < st.index:
                continue
            if ref not in names:
                names.append(ref)
    return names


# ---------------------------------------------------------------------------------------------
# Runs


def _copy_context(
    src: Path,
    dest: Path,
    *,
    reverse: bool,
    shuffle: int | None,
    umask: int | None,
    mtime: float | None = None,
) -> None:
    """Copy a context keeping symlinks and contents, creating entries in sorted, reversed or
    shuffled order (directories are made when their first entry is).  Modes are kept, or with
    ``umask`` made as a git checkout under that umask makes them (0666/0777 minus the umask,
    git keeping only the executable bit).  With ``mtime``, every entry gets another time from
    there on (one second apart, in creation order)."""
    entries: list[tuple[str, int, int]] = []  # (relative path, kind, mode)
    _scan(str(src), "", entries)
    entries.sort()
    if reverse:
        entries.reverse()
    if shuffle is not None:
        random.Random(shuffle).shuffle(entries)
    root = str(dest)
    os.makedirs(root)
    made = {root}
    dirs: list[tuple[str, int]] = [(root, stat.S_IMODE(src.stat().st_mode))]

    def mode_of(kind: int, mode: int) -> int:
        if umask is None:
            return mode
        return (0o777 if kind == _DIR or mode & 0o111 else 0o666) & ~umask

    for k, (rel, kind, mode) in enumerate(entries):
        s, d = os.path.join(src, rel), os.path.join(root, rel)
        parent = os.path.dirname(d)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        times = None if mtime is None else (mtime + k, mtime + k)
        if kind == _DIR:
            if d not in made:
                os.makedirs(d, exist_ok=True)
                made.add(d)
            dirs.append((d, mode))  # mode and time once every entry exists
        elif kind == _LINK:
            os.symlink(os.readlink(s), d)
            if times is not None:
                os.utime(d, times, follow_symlinks=False)
        else:
            _copy_file(s, d, mode_of(kind, mode), times)
    # directory modes once every entry exists (a 0555 directory could not have been filled)
    for k, (d, mode) in enumerate(reversed(dirs)):
        os.chmod(d, mode_of(_DIR, mode))
        if mtime is not None:
            os.utime(d, (mtime - k - 1, mtime - k - 1))


_FILE, _DIR, _LINK = 0, 1, 2


def _scan(src: str, rel: str, out: list[tuple[str, int, int]]) -> None:
    """Regular files, directories and symlinks under ``src/rel`` (sockets, fifos and devices
    are not copied: a build context cannot send them)."""
    with os.scandir(os.path.join(src, rel) if rel else src) as it:
        for e in it:
            r = os.path.join(rel, e.name) if rel else e.name
            if e.is_symlink():
                out.append((r, _LINK, 0))
            elif e.is_dir():
                out.append((r, _DIR, stat.S_IMODE(e.stat().st_mode)))
                _scan(src, r, out)
            elif e.is_file():
                out.append((r, _FILE, stat.S_IMODE(e.stat().st_mode)))


def _copy_file(s: str, d: str, mode: int, times: tuple[float, float] | None) -> None:
    fi = os.open(s, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fo = os.open(d, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while os.sendfile(fo, fi, None, 1 << 30) > 0:
                pass
            os.fchmod(fo, mode)
            if times is not None:
                os.utime(fo, times)
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def _tmpfs_dir(work: Path, name: str) -> Path:
    if _TMPFS.is_dir() and os.access(_TMPFS, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"lbuild-repro-{name}-", dir=_TMPFS))
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))


_UMASKS = (0o027, 0o002)  # run 1 gets 0002, run 2 0027, ...
_TZS = ("Pacific/Kiritimati", "America/Adak")
_LOCALES = ("C", "POSIX")


def plan_runs(spec: ReproSpec, work: Path, cleanup: list[Path]) -> list[Run]:
    """Lay out the builds: directories, environments and flags of each."""
    v = set(spec.variations)
    n = 1 if spec.against else spec.runs
    runs: list[Run] = []
    ctx = spec.context.resolve()
    df = spec.dockerfile.resolve() if spec.dockerfile is not None else None
    for i in range(n):
        used: dict[str, str] = {}
        vary = i > 0 or spec.against is not None
        rdir = work / f"run-{i}"
        rdir.mkdir(parents=True)
        env = dict(os.environ)
        env.pop("LBUILD_HOME", None)
        env.pop(HOSTNAME_ENV, None)
        context, dockerfile = ctx, df
        home = rdir / "home"
        needs_copy = vary and bool(v & {"path", "mtime", "order", "umask"})
        prepare: Callable[[], None] | None = None
        if needs_copy:
            if "order" in v:
                base = _tmpfs_dir(work, f"run{i}")
                cleanup.append(base)
                home = base / "home"
                used["order"] = "reverse creation order" if i % 2 else "shuffled creation order"
                if base.parent == _TMPFS:
                    used["order"] += ", on tmpfs"
            else:
                base = rdir
            depth = "/".join(["x" * (i + 2)] * (i + 1)) if "path" in v else "ctx"
            context = base / depth / "context"
            prepare = _copier(ctx, context, i, v)
            if "path" in v:
                used["path"] = str(context)
            if "mtime" in v:
                used["mtime"] = "shifted"
            if df is not None and df.is_relative_to(ctx):
                dockerfile = context / df.relative_to(ctx)
        umask: int | None = None
        if vary and "umask" in v:
            umask = _UMASKS[i % 2]
            used["umask"] = f"{umask:04o}"
        if vary and "tz" in v:
            env["TZ"] = _TZS[i % 2]
            used["tz"] = env["TZ"]
        if vary and "locale" in v:
            env["LANG"] = env["LC_ALL"] = _LOCALES[i % 2]
            used["locale"] = env["LANG"]
        if vary and "home" in v:
            (rdir / "user-home").mkdir()
            env["HOME"] = str(rdir / "user-home")
            used["home"] = env["HOME"]
        if vary and "hostname" in v:
            env[HOSTNAME_ENV] = f"repro-{i}"
            used["hostname"] = env[HOSTNAME_ENV]
        flags: list[str] = []
        if vary and "jobs" in v:
            flags += ["--jobs", "1"]
            used["jobs"] = "1"
        elif spec.jobs:
            flags += ["--jobs", str(spec.jobs)]
        if vary and "snapshotter" in v:
            flags += ["--snapshotter", "copy"]
            used["snapshotter"] = "copy"
        elif spec.snapshotter:
            flags += ["--snapshotter", spec.snapshotter]
        if "clock" in v and spec.against is None:
            from builder.solve.clockgate import ENV, gate_value

            env[ENV] = gate_value(work / "gate", i, CLOCK_GAP_S)
            if i > 0:
                used["clock"] = f"RUN steps >= {CLOCK_GAP_S * i:g}s after run 0's"
        runs.append(
            Run(i, context, dockerfile, home, rdir / "image", env, umask, flags, used, prepare)
        )
    return runs


def _copier(ctx: Path, context: Path, i: int, v: set[str]) -> Callable[[], None]:
    """Run ``i``'s context copy, made when the run starts (after the earlier runs started)."""

    def prepare() -> None:
        _copy_context(
            ctx,
            context,
            reverse="order" in v and i % 2 == 1,
            shuffle=i if "order" in v and i % 2 == 0 else None,
            umask=_UMASKS[i % 2] if "umask" in v else None,
            mtime=time.time() - 86400 * (10 + i) if "mtime" in v else None,
        )

    return prepare


def _argv(spec: ReproSpec, run: Run, bases: dict[str, str]) -> list[str]:
    argv = [sys.executable, "-m", "builder", "build", *spec.build_argv, *run.flags]
    for name, layout in bases.items():
        argv += ["--build-context", f"{name}={layout}"]
    if run.dockerfile is not None:
        argv += ["-f", str(run.dockerfile)]
    argv += ["--home", str(run.home), "--progress", "plain"]
    argv += ["--output", f"type=oci,dest={run.out}", str(run.context)]
    return argv


def execute(spec: ReproSpec, runs: list[Run], bases: dict[str, str], work: Path) -> None:
    """Start every build (run N once its context copy is made: the copy overlaps the builds
    already running), wait for all of them.  A build's exit is marked for the clock gate, so
    a later build waiting for a step the earlier one never ran goes on."""
    from builder.solve.clockgate import mark_done

    procs: list[tuple[Run, subprocess.Popen[bytes], float]] = []
    logs = []
    try:
        for run in runs:
            if run.prepare is not None:
                run.prepare()
            log = open(run.out.parent / "build.log", "wb")  # noqa: SIM115 (closed below)
            logs.append(log)
            p = subprocess.Popen(
                _argv(spec, run, bases),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=run.env,
                umask=run.umask if run.umask is not None else -1,
            )
            procs.append((run, p, time.monotonic()))
        for run, p, started in procs:  # run N's gate waits for run N-1 only: in order
            run.returncode = p.wait()
            run.seconds = time.monotonic() - started
            if (work / "gate").is_dir():
                mark_done(work / "gate", run.index)
    except BaseException:
        for _, p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise
    finally:
        for log in logs:
            log.close()
    for run in runs:
        run.log = (run.out.parent / "build.log").read_text(errors="replace")


def export_bases(
    spec: ReproSpec, work: Path, export: Callable[[str, Path], bool] | None
) -> dict[str, str]:
    """``--build-context`` for every local base image the Dockerfile names."""
    out: dict[str, str] = {}
    if export is None:
        return out
    for i, ref in enumerate(external_bases(spec.context, spec.dockerfile)):
        if ref in spec.base_contexts:
            continue
        dest = work / "bases" / f"{i}"
        dest.parent.mkdir(exist_ok=True)
        if export(ref, dest):
            out[ref] = f"oci-layout://{dest}:latest"
    return out


def repro_check(
    spec: ReproSpec,
    local: LocalResolver | None = None,
    export: Callable[[str, Path], bool] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> ReproReport:
    """Run the builds and compare run 0 with each other run (or the one build with
    ``spec.against``)."""
    say = on_progress or (lambda _m: None)
    if spec.runs < 2 and spec.against is None:
        raise InvalidInput("repro-check: --runs must be at least 2 (or give --against REF)")
    if not spec.context.is_dir():
        raise InvalidInput(f"repro-check: build context {spec.context} is not a directory")
    steps = chain_steps(spec.context, spec.dockerfile, spec.target)
    against: Image | None = open_image(spec.against, local) if spec.against else None
    keep = spec.work is not None
    work = spec.work or Path(tempfile.mkdtemp(prefix="lbuild-repro-"))
    if keep:
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            raise InvalidInput(f"repro-check: --keep directory {work} is not empty")
    cleanup: list[Path] = []
    try:
        bases = export_bases(spec, work, export)
        runs = plan_runs(spec, work, cleanup)
        say(f"building {len(runs)} time(s) in {work}")
        execute(spec, runs, bases, work)
        for run in runs:
            if run.returncode != 0:
                tail = [ln for ln in run.log.strip().splitlines() if ln.strip()][-1:] or ["?"]
                raise StepFailed(
                    f"repro-check: build {run.index} failed (exit {run.returncode}): {tail[0]}"
                )
        images = [_plain_layers(open_image(f"oci-layout://{r.out}:latest"), r.home) for r in runs]
        diffs: list[tuple[int, DiffResult]] = []
        if against is not None:
            diffs.append((0, diff_images(against, images[0], spec.options)))
        else:
            for i in range(1, len(images)):
                diffs.append((i, diff_images(images[0], images[i], spec.options)))
        return ReproReport(runs, spec.against, diffs, steps, work if keep else None)
    finally:
        for d in cleanup:
            if keep and d.parent == _TMPFS:
                with contextlib.suppress(OSError):
                    shutil.copytree(d, work / d.name, symlinks=True)
            _remove(d)
        if not keep:
            _remove(work)


def _plain_layers(image: Image, home: Path) -> Image:
    """``image`` with each layer read from the uncompressed tar its build left in its home
    (named by its diff_id), when it is there: a differing layer is then not decompressed."""
    from dataclasses import replace

    from cache.store.blobs import BlobStore
    from cache.types import Digest

    if not home.is_dir():
        return image
    store = BlobStore(home)
    layers = []
    for layer in image.layers:
        path = store.path(Digest(layer.diff_id)) if layer.diff_id else None
        if path is not None and path.is_file():
            layer = replace(layer, opener=_file_opener(path))
        layers.append(layer)
    return replace(image, layers=tuple(layers))


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open(path, "rb")

    return opener


def _remove(path: Path) -> None:
    """Remove a tree lbuild made (read-only store files and directories included)."""

    def onerror(func: Callable[..., Any], p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):  # never a file: it may be a
                os.chmod(p, 0o700)  # hard link to a blob of the caller's store
            func(p)

    shutil.rmtree(path, onerror=onerror)


def summary_rows(report: ReproReport) -> Sequence[tuple[str, str, str]]:
    """(run, variations used, manifest digest) for each build."""
    rows = []
    for r in report.runs:
        used = ", ".join(f"{k}={v}" for k, v in r.used.items()) or "baseline"
        rows.append((str(r.index), used, f"{r.seconds:.2f}s"))
    return rows
