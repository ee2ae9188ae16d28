"""Dockerfiles as typed, frozen instructions and stages, and their ARG/ENV resolution.

This module gathers the front end's public names: the instructions live in
:mod:`builder.frontend.instructions`, parsing in :mod:`builder.frontend.parse` and the
ARG/ENV expansion in :mod:`builder.frontend.resolve`.

Parsing uses the official BuildKit grammar (the ``dockerfile`` package); this module turns its
commands into one frozen dataclass per instruction, checks what BuildKit's ``instructions``
package checks (flags, argument counts, stage names, ...), and reports every problem as an
:class:`~cache.errors.InvalidInput` carrying the Dockerfile name and line.

Instructions hold the *raw* text after flag parsing (exec-form JSON already decoded).
:func:`resolve_stage` then expands them the way BuildKit's dockerfile2llb does, with the ARG
and ENV state in force at each instruction:

- ARGs declared before the first FROM ("meta args") are only usable in FROM lines, unless a
  stage re-declares them (``ARG NAME`` without a value picks up the global value);
- ``--build-arg`` overrides the value of *declared* ARGs only;
- ENV and ARG write into one expansion environment in instruction order, so an ENV overrides
  an earlier ARG of the same name (and an ARG declared after an ENV wins, as in BuildKit);
- ADD, COPY (and their --chown/--chmod/--from/--checksum/--exclude flags), ENV, EXPOSE, FROM,
  LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR and ARG defaults are expanded; RUN (except its
  ``--mount`` specs, which BuildKit expands), CMD, ENTRYPOINT, HEALTHCHECK, SHELL, ONBUILD
  and MAINTAINER are not;
- the platform ARGs (BUILDPLATFORM, TARGETARCH, ...) hold this host's values; FROM lines see
  them without a declaration, stages only after ``ARG TARGETARCH`` etc.
"""

from __future__ import annotations

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
    Resolved,
    Run,
    Shell,
    Stage,
    Stopsignal,
    User,
    Volume,
    Workdir,
    instruction_to_json,
    resolved_to_json,
    to_json,
)
from builder.frontend.names import show_as, shown_name
from builder.frontend.parse import load, parse, parse_triggers
from builder.frontend.resolve import (
    DEFAULT_PATH,
    global_args,
    host_platform_args,
    resolve_base,
    resolve_platform,
    resolve_stage,
    unused_build_args,
)

__all__ = [
    "DEFAULT_PATH",
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
    "global_args",
    "host_platform_args",
    "instruction_to_json",
    "load",
    "parse",
    "parse_triggers",
    "resolve_base",
    "resolve_platform",
    "resolve_stage",
    "resolved_to_json",
    "show_as",
    "shown_name",
    "to_json",
    "unused_build_args",
]
