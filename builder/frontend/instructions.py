"""Typed, frozen Dockerfile instructions and stages, and their stable JSON form.

Instructions hold the *raw* text after flag parsing (exec-form JSON already decoded);
:mod:`builder.frontend.parse` builds them, :mod:`builder.frontend.resolve` expands them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Arg",
    "Cmd",
    "Copy",
    "Dockerfile",
    "Entrypoint",
    "Env",
    "Expose",
    "From",
    "Healthcheck",
    "Heredoc",
    "Instruction",
    "Label",
    "Maintainer",
    "Onbuild",
    "Resolved",
    "Run",
    "Shell",
    "Stage",
    "Stopsignal",
    "User",
    "Volume",
    "Workdir",
    "instruction_to_json",
    "resolved_to_json",
    "to_json",
]

_LEADING_TABS = re.compile(r"(?m)^\t+")

# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Heredoc:
    """An inline file given with ``<<NAME`` (RUN, COPY, ADD).

    ``content`` is the body exactly as written (leading tabs kept); ``chomp`` says the marker
    was ``<<-`` (leading tabs are to be stripped: use :attr:`data`); ``expand`` is False when
    the name was quoted (``<<'EOF'``), so variables in the body stay literal; ``fd`` is the
    file descriptor written before ``<<`` (``3<<EOF``), 0 when absent.
    """

    name: str
    content: str
    chomp: bool
    expand: bool
    fd: int = 0

    @property
    def data(self) -> str:
        """The body with leading tabs removed from every line when ``chomp`` is set."""
        return _LEADING_TABS.sub("", self.content) if self.chomp else self.content


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: where it is (1-based lines) and its source text."""

    line: int
    end_line: int
    original: str

    _keyword: ClassVar[str] = ""

    @property
    def keyword(self) -> str:
        """The instruction's name in upper case (``COPY``, ``ADD``, ``RUN``, ...)."""
        return self._keyword


@dataclass(frozen=True)
class From(Instruction):
    """``FROM [--platform=P] IMAGE [AS name]``; ``name`` is lower-cased as Docker does."""

    image: str
    name: str | None
    platform: str | None

    _keyword: ClassVar[str] = "FROM"


@dataclass(frozen=True)
class Run(Instruction):
    """``RUN``: shell form ``command == (script,)``, exec form the decoded JSON list.

    With heredocs (``RUN <<EOF`` or ``RUN python3 <<EOF``) ``command`` holds the text of
    the first line (``("<<EOF",)``) and ``heredocs`` the bodies.  ``mounts`` are the raw
    ``--mount`` values.
    """

    command: tuple[str, ...]
    exec_form: bool
    heredocs: tuple[Heredoc, ...]
    mounts: tuple[str, ...]
    network: str | None
    security: str | None

    _keyword: ClassVar[str] = "RUN"


@dataclass(frozen=True)
class Copy(Instruction):
    """``COPY`` or (``is_add``) ``ADD``.

    ``sources`` are the context/stage paths; inline ``<<NAME`` sources are in ``heredocs``
    (each is written as a file called NAME under ``dest``), as BuildKit separates them.
    """

    sources: tuple[str, ...]
    dest: str
    from_: str | None
    chown: str | None
    chmod: str | None
    link: bool
    is_add: bool
    keep_git_dir: bool
    checksum: str | None
    exclude: tuple[str, ...]
    parents: bool
    heredocs: tuple[Heredoc, ...]

    @property
    def keyword(self) -> str:
        """``ADD`` or ``COPY``."""
        return "ADD" if self.is_add else "COPY"


@dataclass(frozen=True)
class Workdir(Instruction):
    """``WORKDIR path``."""

    path: str

    _keyword: ClassVar[str] = "WORKDIR"


@dataclass(frozen=True)
class Env(Instruction):
    """``ENV K=V ...`` or legacy ``ENV K V``; keys and values are raw (quotes kept)."""

    pairs: tuple[tuple[str, str], ...]

    _keyword: ClassVar[str] = "ENV"


@dataclass(frozen=True)
class Arg(Instruction):
    """``ARG NAME[=default] ...``; the default is raw text, None when absent."""

    pairs: tuple[tuple[str, str | None], ...]

    _keyword: ClassVar[str] = "ARG"


@dataclass(frozen=True)
class Label(Instruction):
    """``LABEL K=V ...``; keys and values are raw (quotes kept)."""

    pairs: tuple[tuple[str, str], ...]

    _keyword: ClassVar[str] = "LABEL"


@dataclass(frozen=True)
class User(Instruction):
    """``USER user[:group]``."""

    user: str

    _keyword: ClassVar[str] = "USER"


@dataclass(frozen=True)
class Expose(Instruction):
    """``EXPOSE port[/proto] ...`` as written (ranges such as ``8000-8002`` not expanded)."""

    ports: tuple[str, ...]

    _keyword: ClassVar[str] = "EXPOSE"


@dataclass(frozen=True)
class Volume(Instruction):
    """``VOLUME path ...`` or ``VOLUME ["path", ...]``."""

    paths: tuple[str, ...]

    _keyword: ClassVar[str] = "VOLUME"


@dataclass(frozen=True)
class Cmd(Instruction):
    """``CMD``: shell form ``args == (text,)``, exec form the decoded JSON list."""

    args: tuple[str, ...]
    exec_form: bool

    _keyword: ClassVar[str] = "CMD"


@dataclass(frozen=True)
class Entrypoint(Instruction):
    """``ENTRYPOINT``: shell form ``args == (text,)``, exec form the decoded JSON list."""

    args: tuple[str, ...]
    exec_form: bool

    _keyword: ClassVar[str] = "ENTRYPOINT"


@dataclass(frozen=True)
class Stopsignal(Instruction):
    """``STOPSIGNAL signal``."""

    signal: str

    _keyword: ClassVar[str] = "STOPSIGNAL"


@dataclass(frozen=True)
class Healthcheck(Instruction):
    """``HEALTHCHECK``: ``test`` is None for ``NONE``, else as Docker's config stores it.

    ``("CMD", arg, ...)`` for the exec form, ``("CMD-SHELL", script)`` for the shell form;
    durations are nanoseconds (None when the flag was not given); ``retries`` None likewise.
    """

    test: tuple[str, ...] | None
    interval: int | None
    timeout: int | None
    start_period: int | None
    start_interval: int | None
    retries: int | None

    _keyword: ClassVar[str] = "HEALTHCHECK"


@dataclass(frozen=True)
class Shell(Instruction):
    """``SHELL ["exe", "arg", ...]`` (JSON form only, as Docker requires)."""

    args: tuple[str, ...]

    _keyword: ClassVar[str] = "SHELL"


@dataclass(frozen=True)
class Onbuild(Instruction):
    """``ONBUILD trigger``: ``expression`` is the trigger text, e.g. ``"RUN make"``."""

    expression: str

    _keyword: ClassVar[str] = "ONBUILD"


@dataclass(frozen=True)
class Maintainer(Instruction):
    """``MAINTAINER name`` (deprecated, still accepted)."""

    name: str

    _keyword: ClassVar[str] = "MAINTAINER"


@dataclass(frozen=True)
class Stage:
    """One ``FROM ... [AS name]`` block; ``instructions`` excludes the FROM itself."""

    index: int
    name: str | None
    base: From
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile: its escape character, meta ARGs and stages."""

    filename: str
    escape: str
    meta_args: tuple[Arg, ...]
    stages: tuple[Stage, ...]

    def stage(self, ref: str) -> Stage | None:
        """Return the stage named ``ref`` (case-insensitive) or with index ``ref``, if any."""
        lowered = ref.lower()
        for stage in self.stages:
            if stage.name is not None and stage.name == lowered:
                return stage
        if ref.isdecimal() and int(ref) < len(self.stages):
            return self.stages[int(ref)]
        return None


@dataclass(frozen=True)
class Resolved:
    """An instruction with Docker's expansion applied, and the state once it has run.

    ``env`` is the image's ENV (base image env first, order kept, a replaced variable keeps
    its place, PATH added when the base has none); ``args`` the ARGs in scope that have a
    value; ``run_env`` the environment a RUN at this point sees and expansion uses (``env``
    with ``args`` written over it in instruction order, as BuildKit does).  All three
    describe the state *after* the instruction, which equals the state before it for every
    instruction except ENV and ARG.  COPY/ADD heredoc bodies are final here: expanded when
    their name was unquoted, tabs chomped, so ``expand`` and ``chomp`` are False.
    """

    instruction: Instruction
    env: tuple[tuple[str, str], ...]
    args: tuple[tuple[str, str], ...]
    run_env: tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------- JSON


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Heredoc):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value


def instruction_to_json(ins: Instruction) -> dict[str, Any]:
    """A stable JSON-ready dict of an instruction: ``kind`` then its fields by name."""
    out: dict[str, Any] = {"kind": ins.keyword}
    for f in dataclasses.fields(ins):
        out[f.name.rstrip("_")] = _jsonable(getattr(ins, f.name))
    return out


def resolved_to_json(resolved: Resolved) -> dict[str, Any]:
    """A JSON-ready dict of a Resolved: the expanded instruction and the state after it."""
    return {
        "instruction": instruction_to_json(resolved.instruction),
        "env": [list(p) for p in resolved.env],
        "args": [list(p) for p in resolved.args],
        "run_env": [list(p) for p in resolved.run_env],
    }


def to_json(dockerfile: Dockerfile) -> dict[str, Any]:
    """A stable JSON-ready dump of a parsed Dockerfile (used by golden tests)."""
    return {
        "filename": dockerfile.filename,
        "escape": dockerfile.escape,
        "meta_args": [instruction_to_json(a) for a in dockerfile.meta_args],
        "stages": [
            {
                "index": s.index,
                "name": s.name,
                "base": instruction_to_json(s.base),
                "instructions": [instruction_to_json(i) for i in s.instructions],
            }
            for s in dockerfile.stages
        ],
    }
