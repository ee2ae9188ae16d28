"""RUN: execute a command on a snapshot of the parent chain; its diff becomes the layer.

The parent's layers are unpacked once into committed snapshots named by chain id; the
command runs in a fresh active snapshot on top (overlayfs or a copy), isolated by
builder.solve.executor; the snapshot's diff is written as a deterministic layer and the active
snapshot is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from builder.frontend import dockerfile as df
from builder.frontend.runmount import parse_mount
from builder.plan.copyspec import db_entry
from cache.errors import InvalidInput, NotFound, StepFailed, Unsupported
from cache.home import mark_used, mount_marker
from cache.types import Digest, Entry, LayerInfo

if TYPE_CHECKING:
    from builder.plan.dag import Step
    from builder.solve.events import RunContext
    from builder.solve.executor import BindSpec, Helper, RunSpec
    from cache.layers.view import View
    from cache.snapshots.snapshot import Snapshotter


@dataclass(frozen=True)
class RunEnv:
    """What RUN steps of one build share: where snapshots, cache mounts and secrets live."""

    home: Path
    context: Path
    secrets: Mapping[str, Path]
    snapshotter: str | None = None
    clamp_mtime: int | None = None  # SOURCE_DATE_EPOCH when set
    allow: frozenset[str] = frozenset()  # entitlements (--allow): network.host


ENTITLEMENT_NETWORK_HOST = "network.host"


def check_entitlements(
    instrs: Iterable[df.Instruction], allow: frozenset[str] | set[str], file: str
) -> None:
    """Refuse (exit 2) a RUN that needs an entitlement the build was not given: as BuildKit,
    ``RUN --network=host`` needs ``--allow network.host``; ``RUN --security=insecure`` (all
    capabilities, no seccomp) is not supported.  Checked before anything runs, so a cached
    step does not slip through."""
    for instr in instrs:
        if isinstance(instr, df.Run) and (instr.security or "").lower() == "insecure":
            raise Unsupported(
                "RUN --security=insecure is not supported yet", file=file, line=instr.line
            )
        host = isinstance(instr, df.Run) and (instr.network or "").lower() == "host"
        if host and ENTITLEMENT_NETWORK_HOST not in allow:
            raise InvalidInput(
                "RUN --network=host needs the network.host entitlement",
                hint="pass --allow network.host to lbuild build",
                file=file,
                line=instr.line,
            )


def resolve_user(
    spec: str, read: Callable[[str], bytes | None], file: str, line: int
) -> tuple[int, int, tuple[int, ...], str]:
    """USER name|uid[:group|gid] -> (uid, gid, supplementary groups, home), as Docker does."""
    user, _, group = (spec or "root").partition(":")
    passwd = (read("etc/passwd") or b"").decode(errors="replace")
    groups_db = (read("etc/group") or b"").decode(errors="replace")
    home = "/"
    if user.isdigit():
        uid, gid, name = int(user), 0, None
        for raw in passwd.splitlines():
            p = raw.split(":")
            if len(p) >= 6 and p[2] == user:
                gid, name, home = int(p[3]), p[0], p[5]
                break
    else:
        found = db_entry(passwd, user)
        if found is None or len(found) < 4:
            raise InvalidInput(
                f"unable to find user {user}: no matching entries in passwd file",
                file=file,
                line=line,
            )
        uid, gid, name = int(found[2]), int(found[3]), user
        home = found[5] if len(found) > 5 else "/"
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = db_entry(groups_db, group)
            if g is None or len(g) < 3:
                raise InvalidInput(
                    f"unable to find group {group}: no matching entries in group file",
                    file=file,
                    line=line,
                )
            gid = int(g[2])
    extra: list[int] = []
    if name is not None and not group:
        for raw in groups_db.splitlines():
            g = raw.split(":")
            if len(g) >= 4 and name in g[3].split(",") and int(g[2]) != gid:
                extra.append(int(g[2]))
    return uid, gid, tuple(sorted(set(extra))), home


def command_argv(instr: df.Run, shell: tuple[str, ...]) -> tuple[tuple[str, ...], bytes | None]:
    """argv (and stdin) for a RUN: exec form as is; shell form through SHELL; heredocs as BuildKit."""
    if instr.exec_form:
        return tuple(instr.command), None
    text = instr.command[0] if instr.command else ""
    if instr.heredocs:
        only = (
            len(instr.heredocs) == 1
            and text.strip().lstrip("0123456789").startswith("<<")
            and len(text.split()) == 1
        )
        if only:
            body = instr.heredocs[0].data
            if body.startswith("#!"):
                interp = body[2:].split("\n", 1)[0].split()
                return (*interp, "/dev/stdin"), body.encode()
            return (*shell, body), None
        script = text + "\n" + "".join(h.content + h.name + "\n" for h in instr.heredocs)
        return (*shell, script), None
    return (*shell, text), None


def mounts_for(
    instr: df.Run, env: RunEnv, workdir: str, file: str, scratch: Path
) -> tuple[list[BindSpec], list[str]]:
    """BindSpecs for a RUN's --mount flags, and the targets to keep out of the layer."""
    from builder.solve.executor import BindSpec

    out: list[BindSpec] = []
    targets: list[str] = []
    for raw in instr.mounts:
        m = parse_mount(raw, file, instr.line)
        t = m.type
        target = m.target
        if target and not target.startswith("/"):
            target = posixpath.join(workdir, target)
        if t == "cache":
            cid = m.id or target
            safe = uuid.uuid5(uuid.NAMESPACE_URL, cid).hex
            d = env.home / "cache-mounts" / safe
            d.mkdir(parents=True, exist_ok=True)
            mark_used(mount_marker(d))  # cache prune ages mounts by their last use
            out.append(
                BindSpec(str(d), target, "bind", readonly=m.readonly)
            )
        elif t == "tmpfs":
            out.append(BindSpec(None, target, "tmpfs"))
        elif t == "secret":
            sid = m.id or posixpath.basename(target)
            if not sid:
                raise InvalidInput(
                    "--mount=type=secret needs id= or target=", file=file, line=instr.line
                )
            src = env.secrets.get(sid)
            if src is None:
                if m.required:
                    raise NotFound(
                        f"secret {sid} not provided (use --secret id={sid},src=FILE)",
                        file=file,
                        line=instr.line,
                    )
                continue
            target = target or f"/run/secrets/{sid}"
            out.append(BindSpec(str(src), target, "bind", readonly=True))
        else:  # bind from the context (read-only unless rw; rw writes are thrown away)
            if m.from_:
                raise InvalidInput(
                    "RUN --mount=type=bind,from=... is not supported yet",
                    file=file,
                    line=instr.line,
                )
            src_rel = posixpath.normpath("/" + (m.source or ".")).lstrip("/")
            src = (env.context / src_rel) if src_rel else env.context
            if not src.exists():
                raise NotFound(
                    f"bind mount source not found in the build context: {src_rel or '.'}",
                    file=file,
                    line=instr.line,
                )
            rw = m.readwrite
            if rw:
                scratch.mkdir(parents=True, exist_ok=True)
                copy = scratch / uuid.uuid4().hex
                if src.is_dir():
                    shutil.copytree(src, copy, symlinks=True)
                else:
                    shutil.copy2(src, copy)
                src = copy
            out.append(BindSpec(str(src), target, "bind", readonly=not rw))
        targets.append(target)
    return out, targets


def _snapshotter(env: RunEnv) -> Snapshotter:
    from cache.snapshots.snapshot import choose_snapshotter, cleanup_stale, overlay_works

    # One root per kind: a committed overlay snapshot holds one layer, a copy snapshot the
    # whole tree, so a copy snapshotter must never find the overlay's snapshots (or back).
    root = env.home / "snapshots"
    kind = env.snapshotter or ("overlay" if overlay_works(root) else "copy")
    snap = choose_snapshotter(root / kind, kind)
    # A builder killed mid-RUN (SIGKILL, SIGTERM, OOM) leaves its active snapshot behind (a
    # whole tree for the copy snapshotter); no live process holds its lock, so it goes now.
    cleanup_stale(root / kind)
    _sweep_scratch(env.home / "tmp")
    return snap


def _sweep_scratch(tmp: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove run scratch directories a killed builder left (old enough not to be in use)."""
    import time

    now = time.time()
    for d in tmp.glob("run-*"):
        with contextlib.suppress(OSError):
            if now - d.lstat().st_mtime > older_than_s:
                shutil.rmtree(d, ignore_errors=True)


class RunSteps:
    """The solver's RUN executor for one build (``__call__``), and the maker of RUN parent
    chains ahead of time (``prefetch``, see builder/solve/prefetch.py); both use one
    snapshotter, made on first use."""

    def __init__(self, env: RunEnv) -> None:
        from builder.solve.clockgate import from_env

        self.env = env
        self._gate = from_env()  # repro-check's clock variation, else None
        self._snap: Snapshotter | None = None
        self._lock = threading.Lock()
        # a helper started when a RUN's chain was first sent ahead (``prefetch``): the RUN
        # then does not wait for the helper's interpreter to start
        self._spare: Helper | None = None
        self._running = 0  # RUN steps under way (a chain sent while one runs is its own)

    def snapshotter(self) -> Snapshotter:
        with self._lock:
            if self._snap is None:
                self._snap = _snapshotter(self.env)
            return self._snap

    def prefetch(self, solver: RunContext, diff_ids: list[Digest]) -> None:
        """Make the committed snapshot chain of ``diff_ids`` (a RUN will need it).  Only
        for per-layer snapshots: a copy snapshot of a prefix is a whole tree the RUN would
        copy again, so the copy snapshotter makes its chain when the RUN starts."""
        from cache.snapshots.base import LayerStacks
        from cache.snapshots.snapshot import ensure_chain

        snap = self.snapshotter()
        if diff_ids and isinstance(snap, LayerStacks):
            self._prestart()
            ensure_chain(snap, diff_ids, solver.store.open, solver.toc, views=solver.chain_view)

    def _prestart(self) -> None:
        from builder.solve.executor import Helper

        with self._lock:
            if self._spare is not None or self._running:
                return
            # as root, with its network namespace and slirp4netns ready for a RUN on the
            # default network (another RUN replaces it: Helper.fits)
            self._spare = Helper(stdin=False, network=os.geteuid() == 0)

    def release(self) -> None:
        """The solve is over: a helper started ahead and not used exits."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()

    def _helper(self, stdin: bool) -> Helper:
        """The helper started ahead when it fits (no stdin), else a new one."""
        from builder.solve.executor import Helper

        with self._lock:
            self._running += 1
            spare, self._spare = (self._spare, None) if not stdin else (None, self._spare)
        return spare if spare is not None else Helper(stdin=stdin)

    def __call__(self, solver: RunContext, step: Step) -> LayerInfo | None:
        instr = step.instr
        assert isinstance(instr, df.Run) and step.state is not None
        command = command_argv(instr, step.state.shell)
        # The sandbox's helper interpreter starts while the snapshot is made (or started
        # when the chain was sent ahead).
        helper = self._helper(stdin=command[1] is not None)
        try:
            return self._run(solver, step, instr, command, helper)
        finally:
            helper.discard()  # nothing to do when the run took it
            with self._lock:
                self._running -= 1

    def _run(
        self,
        solver: RunContext,
        step: Step,
        instr: df.Run,
        command: tuple[tuple[str, ...], bytes | None],
        helper: Helper,
    ) -> LayerInfo | None:
        from builder.solve.executor import run
        from cache.snapshots.mount import mounted_once
        from cache.snapshots.snapshot import ensure_chain

        assert step.state is not None
        file = solver.plan.filename
        snap = self.snapshotter()
        view: View = solver.view(step.stage, step.pos)
        state = step.state
        uid, gid, groups, user_home = resolve_user(
            state.user, solver.read_file(view), file, instr.line
        )
        diff_ids = solver.stage_diff_ids(step.stage, step.pos)
        parent = (
            ensure_chain(snap, diff_ids, solver.store.open, solver.toc, views=solver.chain_view)
            if diff_ids
            else None
        )
        key = f"run-{uuid.uuid4().hex}"
        # Only a read-write bind mount needs scratch space (a throwaway copy of its source).
        scratch = self.env.home / "tmp" / f"run-{uuid.uuid4().hex}"
        try:
            for attempt in range(_PREPARE_ATTEMPTS):
                try:
                    mounts = mounted_once(snap.prepare(key, parent))
                    break
                except NotFound:
                    # Another build took over a layer directory of the chain since it was
                    # made (cache.snapshots.reuse): made again, unpacked whole this time.
                    if not diff_ids or attempt + 1 == _PREPARE_ATTEMPTS:
                        raise
                    parent = ensure_chain(
                        snap,
                        diff_ids,
                        solver.store.open,
                        solver.toc,
                        reuse=False,
                        views=solver.chain_view,
                    )
            argv, stdin = command
            binds, targets = mounts_for(instr, self.env, state.workdir, file, scratch)
            check_entitlements([instr], self.env.allow, file)
            spec = _spec(step, instr, argv, stdin, (uid, gid, groups, user_home), binds, file)
            if self._gate is not None:  # repro-check's clock variation (solve/clockgate.py)
                self._gate.pass_step(step.stage, step.pos, cancel=solver.cancel)
            code = run(
                spec,
                mounts,
                on_output=lambda b: solver.reporter.step_log(step, b),
                cancel=solver.cancel,
                helper=helper,
            )
            if code != 0:
                shown = (
                    " ".join(argv)
                    if instr.exec_form
                    else (instr.command[0] if instr.command else "")
                )
                from builder.solve.rootless import failure_hint

                raise StepFailed(
                    f"RUN {shown} failed: exit code {code}",
                    hint=failure_hint(),
                    file=file,
                    line=instr.line,
                )
            entries = _layer_entries(snap.diff(key), view, targets, self.env, file, instr.line)
            return solver.write(_sorted(entries)) if entries else None
        finally:
            with contextlib.suppress(OSError, NotFound):
                snap.remove(key)
            shutil.rmtree(scratch, ignore_errors=True)


_PREPARE_ATTEMPTS = 3
"""How often a RUN makes its chain again when another build takes over one of its layer
directories between ``ensure_chain`` and ``prepare`` (each time anew, without reuse)."""


def make_run_step(env: RunEnv) -> RunSteps:
    """The solver's RUN executor for one build."""
    return RunSteps(env)


def _spec(
    step: Step,
    instr: df.Run,
    argv: tuple[str, ...],
    stdin: bytes | None,
    user: tuple[int, int, tuple[int, ...], str | None],
    binds: list[BindSpec],
    file: str,
) -> RunSpec:
    """What the sandbox runs: the command, its environment (PATH and HOME as Docker sets
    them when the image does not), user, working directory, mounts and network."""
    from builder.solve.executor import RunSpec

    assert step.state is not None
    uid, gid, groups, user_home = user
    env_pairs = list(step.run_env)
    names = {k for k, _ in env_pairs}
    if "PATH" not in names:
        env_pairs.insert(0, ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
    if "HOME" not in names:
        env_pairs.append(("HOME", user_home or "/"))
    network = (instr.network or "default").lower()
    if network not in ("default", "host", "none"):
        raise InvalidInput(
            f"RUN --network={network} is not supported (use default, host or none)",
            file=file,
            line=instr.line,
        )
    return RunSpec(
        argv=argv,
        env=tuple(env_pairs),
        cwd=step.state.workdir,
        uid=uid,
        gid=gid,
        groups=groups,
        network=network,  # type: ignore[arg-type]
        extra_mounts=tuple(binds),
        stdin_data=stdin,
        # the hostname RUN sees is fixed ("lbuild"); repro-check varies it through
        # this internal variable to find Dockerfiles that would bake it in
        hostname=os.environ.get("LBUILD_RUN_HOSTNAME") or "lbuild",
    )


def _layer_entries(
    entries: list[Entry], view: View, targets: list[str], env: RunEnv, file: str, line: int
) -> list[Entry]:
    """The snapshot's diff as layer entries: ids mapped back for a rootless build, mount
    targets left out, times clamped to SOURCE_DATE_EPOCH when asked."""
    if os.geteuid() != 0:  # rootless: the ids a root build would record (issue 9)
        from builder.solve.rootless import current_map, map_entries

        maps = current_map()
        assert maps is not None
        entries = map_entries(entries, *maps, view.get, file=file, line=line)
    entries = [e for e in entries if not _under(e.path, targets)]
    if env.clamp_mtime is not None:
        entries = [replace(e, mtime=min(e.mtime, env.clamp_mtime)) for e in entries]
    return entries


def _under(path: str, targets: list[str]) -> bool:
    for t in targets:
        t = t.strip("/")
        if t and (path == t or path.startswith(t + "/")):
            return True
    return False


def _sorted(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: e.path.split("/"))


_SECRET_KEYS = frozenset({"id", "src", "source", "type", "env"})
"""The keys buildx's ``--secret`` takes; any other is an error there and here."""


def secrets_from(specs: list[str]) -> dict[str, Path]:
    """``--secret id=NAME,src=FILE`` (docker buildx syntax) -> {NAME: FILE}.

    As buildx: every field is ``key=value`` with a known key (id, src/source, type, env);
    ``type`` is file or env.  Environment secrets are not supported yet (exit 2).
    """
    from cache.errors import Unsupported

    out: dict[str, Path] = {}
    for spec in specs:
        fields: dict[str, str] = {}
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            key = key.strip().lower()
            if not eq:
                raise InvalidInput(
                    f"invalid --secret {spec!r}: field {part!r} must be a key=value pair"
                )
            if key not in _SECRET_KEYS:
                raise InvalidInput(
                    f"invalid --secret {spec!r}: unexpected key {key!r} "
                    "(known: id, src, source, type, env)"
                )
            fields[key] = value
        kind = fields.get("type", "file")
        if kind not in ("file", "env"):
            raise InvalidInput(f"invalid --secret {spec!r}: unsupported secret type {kind!r}")
        sid = fields.get("id")
        src = fields.get("src") or fields.get("source")
        if kind == "env" or ("env" in fields and not src):
            raise Unsupported(
                f"--secret {spec!r}: environment secrets are not supported yet; use src=FILE"
            )
        if not sid:
            raise InvalidInput(f"invalid --secret {spec!r}: id= is required")
        if not src:
            raise InvalidInput(f"invalid --secret {spec!r}: src=FILE is required")
        p = Path(src)
        if not p.is_file():
            raise NotFound(f"--secret {sid}: {src} is not a file")
        out[sid] = p
    return out
