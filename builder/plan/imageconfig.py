"""The image config a stage accumulates: Env, Cmd, Entrypoint, WorkingDir, User, … and history.

Config-only instructions (ENV, LABEL, CMD, …) are pure functions of the expanded instruction
and the config before it, so they are recomputed on every build and cost nothing.  Rules
follow BuildKit's dockerfile2llb where it differs from older docker builds (PEERS.md):
SHELL applies to shell-form CMD/ENTRYPOINT; EXPOSE ranges expand; a replaced ENV keeps its
place; FROM scratch gets WorkingDir ``/`` and a default PATH.
"""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass, field
from typing import Any

from builder.frontend import dockerfile as df
from cache.errors import InvalidInput
from cache.platform import host_platform

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_SHELL = ("/bin/sh", "-c")
AUTHOR_KEY = "_author"  # MAINTAINER, kept in the config state until final_config


def iso_time(epoch: int) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(epoch, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ImageState:
    """The OCI image config of a stage while it is being built (mutated step by step)."""

    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    cmd_set: bool = False

    @classmethod
    def scratch(cls) -> ImageState:
        return cls(config={"Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/"})

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ImageState:
        """State of a base image, from its OCI config JSON."""
        inner = dict(cfg.get("config") or {})
        return cls(
            config=inner,
            history=[dict(h) for h in cfg.get("history") or []],
            diff_ids=list((cfg.get("rootfs") or {}).get("diff_ids") or []),
        )

    def clone(self) -> ImageState:
        return ImageState(
            copy.deepcopy(self.config),
            [dict(h) for h in self.history],
            list(self.diff_ids),
            self.cmd_set,
        )

    # --- accessors used by step keys and executors -------------------------------------
    @property
    def env(self) -> list[str]:
        return list(self.config.get("Env") or [])

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "/")

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")

    @property
    def shell(self) -> tuple[str, ...]:
        sh = self.config.get("Shell")
        return tuple(sh) if sh else DEFAULT_SHELL

    def set_env(self, key: str, value: str) -> None:
        env = self.env
        for i, kv in enumerate(env):
            if kv.split("=", 1)[0] == key:
                env[i] = f"{key}={value}"
                break
        else:
            env.append(f"{key}={value}")
        self.config["Env"] = env

    def final_config(self, epoch: int) -> dict[str, Any]:
        """The OCI image config JSON object for this state."""
        os_name, arch, variant = host_platform()
        inner = {k: v for k, v in self.config.items() if v not in (None, [], {}, "")}
        author = inner.pop(AUTHOR_KEY, None)
        created = iso_time(epoch)
        out: dict[str, Any] = {
            "architecture": arch,
            "os": os_name,
            "created": created,
            "config": inner,
            "rootfs": {"type": "layers", "diff_ids": list(self.diff_ids)},
            "history": _complete_history(self.history, len(self.diff_ids), created),
        }
        if variant:
            out["variant"] = variant
        if author:
            out["author"] = author
        return out


def _complete_history(
    history: list[dict[str, Any]], layers: int, created: str
) -> list[dict[str, Any]]:
    """History with one non-empty entry per layer, as the image spec asks.

    A base image may come without history for its layers (umoci ``--no-history``, hand-made
    images); as BuildKit does, the missing entries are added in front, where the base's
    layers are."""
    missing = layers - sum(1 for h in history if not h.get("empty_layer"))
    if missing <= 0:
        return history
    filler = {"created": created, "created_by": "", "comment": "lbuild: no history in base image"}
    return [dict(filler) for _ in range(missing)] + history


def _shell_wrap(state: ImageState, args: tuple[str, ...], exec_form: bool) -> list[str]:
    return list(args) if exec_form else [*state.shell, " ".join(args)]


def _expand_ports(ports: tuple[str, ...], file: str, line: int) -> list[str]:
    out: list[str] = []
    for raw in ports:
        for port in raw.split():
            proto = "tcp"
            if "/" in port:
                port, proto = port.split("/", 1)
                proto = proto.lower()
            if proto not in ("tcp", "udp", "sctp"):
                raise InvalidInput(f"invalid proto: {proto}", file=file, line=line)
            if ":" in port:
                raise InvalidInput(f"invalid containerPort: {port}", file=file, line=line)
            lo, _, hi = port.partition("-")
            try:
                a = int(lo)
                b = int(hi) if hi else a
            except ValueError:
                raise InvalidInput(f"invalid containerPort: {port}", file=file, line=line) from None
            if b < a:
                raise InvalidInput(f"invalid range: {port}", file=file, line=line)
            out.extend(f"{p}/{proto}" for p in range(a, b + 1))
    return out


def history_text(instr: df.Instruction) -> str:
    """The history ``created_by`` text of an instruction, BuildKit style."""
    text = instr.original.split("\n", 1)[0].strip()
    return text


def apply_config(state: ImageState, instr: df.Instruction, file: str) -> bool:
    """Apply a config-only instruction to ``state``. Returns False if ``instr`` is not config-only."""
    line = instr.line
    cfg = state.config
    if isinstance(instr, df.Env):
        for k, v in instr.pairs:
            state.set_env(k, v)
    elif isinstance(instr, df.Label):
        labels = dict(cfg.get("Labels") or {})
        for k, v in instr.pairs:
            labels[k] = v
        cfg["Labels"] = labels
    elif isinstance(instr, df.User):
        cfg["User"] = instr.user
    elif isinstance(instr, df.Expose):
        ports = dict(cfg.get("ExposedPorts") or {})
        for p in _expand_ports(instr.ports, file, line):
            ports[p] = {}
        cfg["ExposedPorts"] = ports
    elif isinstance(instr, df.Volume):
        vols = dict(cfg.get("Volumes") or {})
        for v in instr.paths:
            if not v.strip():
                raise InvalidInput(
                    "VOLUME specified can not be an empty string", file=file, line=line
                )
            vols[v] = {}
        cfg["Volumes"] = vols
    elif isinstance(instr, df.Cmd):
        cfg["Cmd"] = _shell_wrap(state, instr.args, instr.exec_form)
        state.cmd_set = True
    elif isinstance(instr, df.Entrypoint):
        cfg["Entrypoint"] = _shell_wrap(state, instr.args, instr.exec_form)
        if not state.cmd_set:
            cfg["Cmd"] = None
    elif isinstance(instr, df.Stopsignal):
        cfg["StopSignal"] = instr.signal
    elif isinstance(instr, df.Healthcheck):
        if instr.test is None:
            cfg["Healthcheck"] = {"Test": ["NONE"]}
        else:
            hc: dict[str, Any] = {"Test": list(instr.test)}
            for name, val in (
                ("Interval", instr.interval),
                ("Timeout", instr.timeout),
                ("StartPeriod", instr.start_period),
                ("StartInterval", instr.start_interval),
                ("Retries", instr.retries),
            ):
                if val is not None:
                    hc[name] = val
            cfg["Healthcheck"] = hc
    elif isinstance(instr, df.Shell):
        cfg["Shell"] = list(instr.args)
    elif isinstance(instr, df.Onbuild):
        cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), instr.expression]
    elif isinstance(instr, df.Maintainer):
        # the last MAINTAINER wins; final_config moves it to the top-level "author"
        cfg[AUTHOR_KEY] = instr.name
    elif isinstance(instr, df.Arg):
        pass
    else:
        return False
    return True


def join_workdir(current: str, path: str) -> str:
    """WORKDIR semantics: relative paths chain onto the current working directory."""
    if not path.startswith("/"):
        path = posixpath.join(current or "/", path)
    return posixpath.normpath(path) if path != "/" else "/"
