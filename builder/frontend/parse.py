"""Dockerfile bytes to typed instructions with the official BuildKit grammar.

Parsing uses the ``dockerfile`` package (BuildKit's parser); this module reads the parser
directives, turns each command into one frozen dataclass of
:mod:`builder.frontend.instructions`, checks what BuildKit's ``instructions`` package checks
(flags, argument counts, stage names, ...), and reports every problem as an
:class:`~cache.errors.InvalidInput` carrying the Dockerfile name and line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from builder.frontend.expand import heredoc_word_name, split_words
from builder.frontend.instructions import (
    Arg,
    Cmd,
    Copy,
    Dockerfile,
    Entrypoint,
    Env,
    Expose,
    From,
    Healthcheck,
    Heredoc,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    Run,
    Shell,
    Stage,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from builder.frontend.names import shown_name
from builder.frontend.parse_errors import (
    first_rejected_line,
    locate_parse_error,
    start_of_instruction,
)
from builder.frontend.runmount import parse_mount
from builder.frontend.suggest import did_you_mean
from cache.errors import InvalidInput, NotFound

__all__ = ["load", "parse", "parse_triggers"]

_STAGE_NAME = re.compile(r"^[a-z][a-z0-9-_.]*$")
_HEREDOC_WORD = re.compile(r"^(\d*)<<(-?)([^<]*)$")
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})

# --------------------------------------------------------------------------- parsing


class _Flags:
    """The parsed ``--flag`` values of one instruction (BuildKit's BFlags rules)."""

    def __init__(self, values: dict[str, str | bool | list[str]]) -> None:
        self._values = values

    def string(self, name: str) -> str | None:
        value = self._values.get(name)
        return value if isinstance(value, str) else None

    def boolean(self, name: str) -> bool:
        return self._values.get(name) is True

    def strings(self, name: str) -> tuple[str, ...]:
        value = self._values.get(name)
        return tuple(value) if isinstance(value, list) else ()


class _Command:
    """One command from the BuildKit parser with what is needed to report errors."""

    def __init__(self, cmd: Any, filename: str, escape: str, lines: Sequence[str]) -> None:
        self.cmd = cmd
        self.keyword: str = str(cmd.cmd).upper()
        self.args: tuple[str, ...] = tuple(cmd.value)
        self.json: bool = bool(cmd.json)
        self.line: int = int(cmd.start_line)
        self.end_line: int = int(cmd.end_line)
        self.original: str = str(cmd.original)
        self.filename = filename
        self.escape = escape
        self.lines = lines

    def error(self, message: str, hint: str | None = None) -> InvalidInput:
        return InvalidInput(message, hint=hint, file=self.filename, line=self.line)

    def where(self) -> dict[str, Any]:
        return {"line": self.line, "end_line": self.end_line, "original": self.original}

    def flags(self, spec: Mapping[str, str]) -> _Flags:
        """Parse ``--name=value`` flags; spec maps name -> "bool" | "string" | "strings"."""
        values: dict[str, str | bool | list[str]] = {}
        for raw in self.cmd.flags:
            if raw == "--":
                break
            name, eq, value = str(raw)[2:].partition("=")
            kind = spec.get(name)
            if kind is None:
                raise self.error(f"unknown flag for {self.keyword}: --{name}")
            if name in values and kind != "strings":
                raise self.error(f"duplicate flag for {self.keyword}: --{name}")
            if kind == "bool":
                if eq and value == "":
                    raise self.error(f"missing a value on flag --{name} of {self.keyword}")
                if not eq or value.lower() in ("true", "false"):
                    values[name] = not eq or value.lower() == "true"
                else:
                    raise self.error(
                        f"expecting a boolean value for flag --{name} of {self.keyword}, "
                        f"not: {value}"
                    )
                continue
            if not eq:
                raise self.error(
                    f"missing a value on flag --{name} of {self.keyword}",
                    hint=f"flags take the form --{name}=VALUE",
                )
            if kind == "strings":
                existing = values.setdefault(name, [])
                assert isinstance(existing, list)
                existing.append(value)
            else:
                values[name] = value
        return _Flags(values)

    def no_flags(self) -> None:
        self.flags({})

    def exactly_one(self) -> str:
        self.no_flags()
        if len(self.args) != 1:
            raise self.error(f"{self.keyword} requires exactly one argument")
        return self.args[0]

    def at_least_one(self) -> None:
        if not self.args:
            raise self.error(f"{self.keyword} requires at least one argument")


def _heredoc_markers(words: Sequence[str]) -> list[tuple[str, bool, bool, int]]:
    """Return (name, chomp, expand, fd) for each heredoc marker among words, in order."""
    found = []
    for word in words:
        marker = _heredoc_marker(word)
        if marker is not None:
            found.append(marker)
    return found


def _heredoc_marker(word: str) -> tuple[str, bool, bool, int] | None:
    match = _HEREDOC_WORD.match(word)
    if match is None or not match.group(3):
        return None
    named = heredoc_word_name(match.group(3))
    if named is None:
        return None
    fd = int(match.group(1)) if match.group(1) else 0
    return named[0], match.group(2) == "-", named[1], fd


def _attach_heredocs(c: _Command, markers: Sequence[tuple[str, bool, bool, int]]) -> list[Heredoc]:
    """Pair the parser's heredoc bodies with the markers that introduced them."""
    bodies = list(c.cmd.heredocs)
    docs = []
    for i, body in enumerate(bodies):
        _, chomp, expand, fd = markers[i] if i < len(markers) else (str(body.name), False, True, 0)
        docs.append(
            Heredoc(
                name=str(body.name),
                content=str(body.content),
                chomp=chomp,
                expand=expand,
                fd=int(body.file_descriptor or fd),
            )
        )
    return docs


def _parse_from(c: _Command) -> From:
    flags = c.flags({"platform": "string"})
    args = c.args
    name: str | None = None
    if len(args) == 3 and args[1].lower() == "as":
        name = args[2].lower()
        if not _STAGE_NAME.match(name):
            raise c.error(
                f'invalid name for build stage: "{args[2]}", '
                "name can't start with a number or contain symbols"
            )
    elif len(args) != 1:
        raise c.error("FROM requires either one or three arguments")
    return From(**c.where(), image=args[0], name=name, platform=flags.string("platform"))


def _parse_run(c: _Command) -> Run:
    flags = c.flags({"mount": "strings", "network": "string", "security": "string"})
    network = flags.string("network")
    if network is not None and network not in ("default", "none", "host"):
        raise c.error(f"unsupported network mode for RUN: {network} (use default, none or host)")
    security = flags.string("security")
    if security is not None and security not in ("sandbox", "insecure"):
        raise c.error(f"unsupported security mode for RUN: {security} (use sandbox or insecure)")
    mounts = flags.strings("mount")
    for raw in mounts:
        if "$" not in raw:  # with variables it is checked once they are expanded
            parse_mount(raw, c.filename, c.line)
    heredocs: list[Heredoc] = []
    if not c.json and c.cmd.heredocs:
        heredocs = _attach_heredocs(c, _heredoc_markers(split_words(" ".join(c.args))))
    return Run(
        **c.where(),
        command=c.args,
        exec_form=c.json,
        heredocs=tuple(heredocs),
        mounts=mounts,
        network=network,
        security=security,
    )


def _parse_copy(c: _Command) -> Copy:
    is_add = c.keyword == "ADD"
    if len(c.args) < 2:
        raise c.error(
            f"{c.keyword} requires at least two arguments, but only one was provided. "
            "Destination could not be determined"
        )
    spec = {"chown": "string", "chmod": "string", "link": "bool", "exclude": "strings"}
    if is_add:
        spec.update({"keep-git-dir": "bool", "checksum": "string"})
    else:
        spec.update({"from": "string", "parents": "bool"})
    flags = c.flags(spec)
    dest = c.args[-1]
    sources: list[str] = []
    markers: list[tuple[str, bool, bool, int]] = []
    if c.json:
        sources = list(c.args[:-1])
    else:
        if _heredoc_marker(dest) is not None:
            raise c.error(f"{c.keyword} cannot accept a heredoc as a destination")
        for src in c.args[:-1]:
            marker = _heredoc_marker(src)
            if marker is None:
                sources.append(src)
            else:
                markers.append(marker)
    heredocs = _attach_heredocs(c, markers) if markers else []
    return Copy(
        **c.where(),
        sources=tuple(sources),
        dest=dest,
        from_=flags.string("from"),
        chown=flags.string("chown"),
        chmod=flags.string("chmod"),
        link=flags.boolean("link"),
        is_add=is_add,
        keep_git_dir=flags.boolean("keep-git-dir"),
        checksum=flags.string("checksum"),
        exclude=flags.strings("exclude"),
        parents=flags.boolean("parents"),
        heredocs=tuple(heredocs),
    )


def _pairs(c: _Command) -> tuple[tuple[str, str], ...]:
    c.no_flags()
    c.at_least_one()
    pairs = tuple((c.args[i], c.args[i + 1]) for i in range(0, len(c.args) - 1, 2))
    if len(c.args) % 2 or any(not key for key, _ in pairs):
        raise c.error(f"{c.keyword} names can not be blank")
    return pairs


def _parse_arg(c: _Command) -> Arg:
    c.no_flags()
    c.at_least_one()
    pairs: list[tuple[str, str | None]] = []
    for word in c.args:
        key, eq, value = word.partition("=")
        if not key:
            raise c.error("ARG names can not be blank")
        pairs.append((key, value if eq else None))
    return Arg(**c.where(), pairs=tuple(pairs))


def _parse_volume(c: _Command) -> Volume:
    c.no_flags()
    c.at_least_one()
    paths = tuple(p.strip() for p in c.args)
    if any(not p for p in paths):
        raise c.error("VOLUME specified can not be an empty string")
    return Volume(**c.where(), paths=paths)


def _parse_expose(c: _Command) -> Expose:
    c.no_flags()
    c.at_least_one()
    return Expose(**c.where(), ports=c.args)


def _parse_shell(c: _Command) -> Shell:
    c.no_flags()
    if not c.args:
        raise c.error("SHELL requires at least one argument")
    if not c.json:
        raise c.error("SHELL requires the arguments to be in JSON form")
    return Shell(**c.where(), args=c.args)


_GO_UNITS: Mapping[str, int] = MappingProxyType(
    {
        "ns": 1,
        "us": 1_000,
        "\u00b5s": 1_000,
        "\u03bcs": 1_000,
        "ms": 1_000_000,
        "s": 1_000_000_000,
        "m": 60_000_000_000,
        "h": 3_600_000_000_000,
    }
)
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([^\d.]+)")


def _go_duration(text: str) -> int:
    """Parse a Go ``time.ParseDuration`` string into nanoseconds; ValueError if invalid."""
    body = text
    sign = 1
    if body[:1] in ("+", "-"):
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    if body == "0":
        return 0
    if not body:
        raise ValueError(text)
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _GO_DURATION_PART.match(body, pos)
        if match is None or match.group(2) not in _GO_UNITS:
            raise ValueError(text)
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return sign * round(total)


def _duration_flag(c: _Command, flags: _Flags, name: str) -> int | None:
    value = flags.string(name)
    if value is None:
        return None
    if value == "":
        return 0
    try:
        ns = _go_duration(value)
    except ValueError:
        raise c.error(
            f"invalid duration for HEALTHCHECK --{name}: {value!r}",
            hint="use Go durations such as 30s, 1m30s or 500ms",
        ) from None
    if ns != 0 and ns < 1_000_000:
        raise c.error(f'Interval "{name}" cannot be less than 1ms')
    return ns


def _parse_healthcheck(c: _Command) -> Healthcheck:
    c.at_least_one()
    flags = c.flags(
        {
            "interval": "string",
            "timeout": "string",
            "start-period": "string",
            "start-interval": "string",
            "retries": "string",
        }
    )
    kind = c.args[0].upper()
    rest = c.args[1:]
    if kind == "NONE":
        if rest:
            raise c.error("HEALTHCHECK NONE takes no arguments")
        return Healthcheck(
            **c.where(),
            test=None,
            interval=None,
            timeout=None,
            start_period=None,
            start_interval=None,
            retries=None,
        )
    if kind != "CMD":
        raise c.error(f'Unknown type "{kind}" in HEALTHCHECK (try CMD)')
    if not rest:
        raise c.error("Missing command after HEALTHCHECK CMD")
    retries: int | None = None
    raw_retries = flags.string("retries")
    if raw_retries:
        try:
            retries = int(raw_retries, 10)
        except ValueError:
            raise c.error(
                f"HEALTHCHECK --retries must be an integer, not {raw_retries!r}"
            ) from None
        if retries < 0:
            raise c.error(f"--retries cannot be negative ({retries})")
    return Healthcheck(
        **c.where(),
        test=("CMD" if c.json else "CMD-SHELL", *rest),
        interval=_duration_flag(c, flags, "interval"),
        timeout=_duration_flag(c, flags, "timeout"),
        start_period=_duration_flag(c, flags, "start-period"),
        start_interval=_duration_flag(c, flags, "start-interval"),
        retries=retries,
    )


def _parse_onbuild(c: _Command) -> Onbuild:
    c.no_flags()
    trigger = str(c.cmd.sub_cmd or "").upper()
    if not trigger:
        raise c.error("ONBUILD requires at least one argument")
    if trigger == "ONBUILD":
        raise c.error("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
    if trigger in ("FROM", "MAINTAINER"):
        raise c.error(f"{trigger} isn't allowed as an ONBUILD trigger")
    if trigger not in _PARSERS:
        raise c.error(f"unknown instruction: {c.cmd.sub_cmd}{did_you_mean(trigger, _PARSERS)}")
    expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", c.original)
    # The parser does not attach heredoc bodies to ONBUILD triggers: take them from the
    # source lines that follow the (possibly continued) first line.
    first_end = _continuation_end(c.lines, c.line, c.escape)
    if c.end_line > first_end and _heredoc_markers(split_words(expression)):
        body = c.lines[first_end : c.end_line]
        expression += "\n" + "\n".join(body)
    return Onbuild(**c.where(), expression=expression)


def _continuation_end(lines: Sequence[str], start: int, escape: str) -> int:
    """Return the last line (1-based) of the instruction text that begins on line start."""
    line = start
    while line < len(lines):
        text = lines[line - 1].rstrip()
        stripped = text.lstrip()
        continues = text.endswith(escape) or (line > start and (not stripped or stripped[0] == "#"))
        if not continues:
            break
        line += 1
    return line


def _parse_cmd(c: _Command) -> Cmd:
    c.no_flags()
    return Cmd(**c.where(), args=c.args, exec_form=c.json)


def _parse_entrypoint(c: _Command) -> Entrypoint:
    c.no_flags()
    return Entrypoint(**c.where(), args=c.args, exec_form=c.json)


_PARSERS: Mapping[str, Callable[[_Command], Instruction]] = MappingProxyType(
    {
        "FROM": _parse_from,
        "RUN": _parse_run,
        "COPY": _parse_copy,
        "ADD": _parse_copy,
        "WORKDIR": lambda c: Workdir(**c.where(), path=c.exactly_one()),
        "ENV": lambda c: Env(**c.where(), pairs=_pairs(c)),
        "ARG": _parse_arg,
        "LABEL": lambda c: Label(**c.where(), pairs=_pairs(c)),
        "USER": lambda c: User(**c.where(), user=c.exactly_one()),
        "EXPOSE": _parse_expose,
        "VOLUME": _parse_volume,
        "CMD": _parse_cmd,
        "ENTRYPOINT": _parse_entrypoint,
        "STOPSIGNAL": lambda c: Stopsignal(**c.where(), signal=c.exactly_one()),
        "HEALTHCHECK": _parse_healthcheck,
        "SHELL": _parse_shell,
        "ONBUILD": _parse_onbuild,
        "MAINTAINER": lambda c: Maintainer(**c.where(), name=c.exactly_one()),
    }
)


def _directives(text: str, filename: str) -> tuple[str, str]:
    """Read the parser directives; return the escape character and the text for the parser.

    As BuildKit reads them: directives count only at the top of the file, and any other
    line (blank, a plain comment, or an unknown directive) ends them, so a later
    ``# escape=`` is a comment.  BuildKit knows ``syntax``, ``escape`` and ``check``; the
    bundled parser predates ``check`` and would stop at it, so a ``# check=`` line of the
    directive block is moved after the others in the text the parser reads (every line
    keeps its number).  A bad escape token gives BuildKit's message, whatever its place.
    """
    escape = "\\"
    seen: dict[str, int] = {}
    lines = text.split("\n")
    checks: list[int] = []
    for number, raw in enumerate(lines, start=1):
        body = raw.lstrip("\ufeff") if number == 1 else raw
        match = _DIRECTIVE.match(body.strip())
        name = match.group(1).lower() if match is not None else ""
        if match is None or name not in _KNOWN_DIRECTIVES:
            break
        if name in seen:
            raise InvalidInput(
                f"only one {name} parser directive can be used", file=filename, line=number
            )
        seen[name] = number
        if name == "check":
            checks.append(number - 1)
        elif name == "escape":
            escape = match.group(2)
            if escape not in ("\\", "`"):
                raise InvalidInput(
                    f"invalid escape token '{escape}' does not match ` or \\",
                    file=filename,
                    line=number,
                )
    if checks:
        block = len(seen)
        kept = [lines[i] for i in range(block) if i not in checks]
        lines[:block] = kept + [lines[i] for i in checks]
        text = "\n".join(lines)
    return escape, text


def parse(text: str, filename: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text into stages of typed instructions.

    Raises InvalidInput (``FILE:LINE: message``) for syntax errors and for what BuildKit
    rejects before building: unknown instructions, instructions other than ARG before the
    first FROM, no FROM at all, bad flags, wrong argument counts, bad or duplicate stage
    names, SHELL not in JSON form, bad HEALTHCHECK options, and the like.
    """
    import dockerfile as buildkit

    escape, text = _directives(text, filename)
    lines = text.lstrip("\ufeff").splitlines()
    try:
        commands = buildkit.parse_string(text)
    except buildkit.GoParseError as err:
        message = str(err)
        line = None
        if message != "file with no instructions":
            line = locate_parse_error(buildkit.parse_string, text, message)
            if line is not None:
                line = start_of_instruction(lines, line, escape)
        raise InvalidInput(message, file=filename, line=line) from None
    except UnicodeDecodeError:
        # The parser rejected the text, but the `dockerfile` binding could not decode its
        # message (cut inside a multi-byte character): name the line, not the words.
        raise InvalidInput(
            "invalid instruction (the parser's message about it is not valid UTF-8)",
            file=filename,
            line=first_rejected_line(buildkit, lines, escape),
        ) from None

    meta_args: list[Arg] = []
    stages: list[tuple[From, list[Instruction]]] = []
    names: dict[str, int] = {}
    for cmd in commands:
        c = _Command(cmd, filename, escape, lines)
        build = _PARSERS.get(c.keyword)
        if build is None:
            raise c.error(
                f"unknown instruction: {cmd.cmd}{did_you_mean(c.keyword.upper(), _PARSERS)}"
            )
        instruction = build(c)
        if isinstance(instruction, From):
            if instruction.name is not None:
                if instruction.name in names:
                    raise c.error(
                        f'duplicate stage name "{instruction.name}" '
                        f"(first used on line {names[instruction.name]})"
                    )
                names[instruction.name] = instruction.line
            stages.append((instruction, []))
        elif stages:
            stages[-1][1].append(instruction)
        elif isinstance(instruction, Arg):
            meta_args.append(instruction)
        else:
            raise c.error(
                f"no build stage in current context: {c.keyword} before the first FROM",
                hint="only ARG may come before the first FROM",
            )
    if not stages:
        raise InvalidInput("dockerfile contains no stages to build", file=filename)
    return Dockerfile(
        filename=filename,
        escape=escape,
        meta_args=tuple(meta_args),
        stages=tuple(
            Stage(index=i, name=base.name, base=base, instructions=tuple(body))
            for i, (base, body) in enumerate(stages)
        ),
    )


def load(path: str | Path) -> Dockerfile:
    """Read and parse a Dockerfile from disk (UTF-8, an optional BOM is ignored)."""
    p = Path(path)
    name = shown_name(p)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"Dockerfile not found: {name}") from None
    except IsADirectoryError:
        raise InvalidInput(f"cannot read Dockerfile {name}: it is a directory") from None
    except OSError as err:
        raise InvalidInput(f"cannot read Dockerfile {name}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(
            f"cannot read Dockerfile {name}: not UTF-8 text (byte {err.start})"
        ) from None
    return parse(text, filename=name)


def parse_triggers(triggers: Sequence[str], filename: str, line: int) -> tuple[Instruction, ...]:
    """The instructions of ONBUILD triggers, to run right after a FROM that inherits them.

    As BuildKit's ``initOnBuildTriggers``: each trigger is parsed on its own (default escape,
    no directives) and must be one instruction, neither FROM, MAINTAINER nor ONBUILD; every
    trigger reports the FROM's line (``line``) as its place.
    """
    from dataclasses import replace

    out: list[Instruction] = []
    for trigger in triggers:
        try:
            stages = parse("FROM scratch\n" + trigger + "\n", filename=filename).stages
        except InvalidInput as err:
            raise InvalidInput(
                f"ONBUILD trigger {trigger!r}: {err.message}", file=filename, line=line
            ) from None
        body = stages[0].instructions if len(stages) == 1 else ()
        if len(stages) != 1 or len(body) != 1:
            raise InvalidInput(
                f"ONBUILD trigger {trigger!r}: a trigger must be one instruction "
                "(not FROM, MAINTAINER or ONBUILD)",
                file=filename,
                line=line,
            )
        ins = body[0]
        if isinstance(ins, Onbuild | Maintainer):
            raise InvalidInput(
                f"ONBUILD trigger {trigger!r}: {ins.keyword} isn't allowed as an ONBUILD trigger",
                file=filename,
                line=line,
            )
        out.append(replace(ins, line=line, end_line=line))
    return tuple(out)
