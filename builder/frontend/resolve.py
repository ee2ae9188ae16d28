"""Docker's ARG/ENV expansion of a parsed Dockerfile, stage by stage.

:func:`resolve_stage` expands instructions the way BuildKit's dockerfile2llb does, with the
ARG and ENV state in force at each instruction:

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from builder.frontend.expand import expand_word, expand_words
from builder.frontend.instructions import (
    Arg,
    Copy,
    Dockerfile,
    Env,
    Expose,
    Instruction,
    Label,
    Resolved,
    Run,
    Stage,
    Stopsignal,
    User,
    Volume,
    Workdir,
)
from cache.errors import InvalidInput

__all__ = [
    "DEFAULT_PATH",
    "global_args",
    "host_platform_args",
    "resolve_base",
    "resolve_platform",
    "resolve_stage",
    "unused_build_args",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The PATH BuildKit adds to a stage's environment when its base image sets none."""


# Build args Docker accepts without an ARG declaration (they never trigger a warning).
_PROXY_ARGS = frozenset(
    n
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
    for n in (name, name.lower())
)

# --------------------------------------------------------------------------- resolution


def host_platform_args() -> dict[str, str]:
    """The predefined platform ARGs for this machine (build = target: no cross builds)."""
    from cache.platform import host_platform

    _os, arch, variant = host_platform()
    plat = f"linux/{arch}" + (f"/{variant}" if variant else "")
    values: dict[str, str] = {}
    for prefix in ("BUILD", "TARGET"):
        values[f"{prefix}PLATFORM"] = plat
        values[f"{prefix}OS"] = "linux"
        values[f"{prefix}ARCH"] = arch
        values[f"{prefix}VARIANT"] = variant
    return values


def global_args(
    dockerfile: Dockerfile,
    build_args: Mapping[str, str],
    *,
    platform_args: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The values FROM lines see: platform ARGs, then the meta ARGs with their overrides.

    A meta ARG's default is expanded with the ARGs before it; ``build_args`` replace the
    value of declared ARGs (and of the platform ARGs).  A meta ARG with neither a default
    nor an override has no value and is left out.
    """
    values = dict(host_platform_args() if platform_args is None else platform_args)
    for key in values:
        if key in build_args:
            values[key] = build_args[key]
    for arg in dockerfile.meta_args:
        for key, default in arg.pairs:
            if key in build_args:
                values[key] = build_args[key]
            elif default is not None:
                values[key] = expand_word(
                    default,
                    values,
                    escape=dockerfile.escape,
                    file=dockerfile.filename,
                    line=arg.line,
                )
    return values


def resolve_base(
    dockerfile: Dockerfile,
    stage: Stage,
    build_args: Mapping[str, str],
    *,
    platform_args: Mapping[str, str] | None = None,
) -> str:
    """The stage's FROM image with meta ARGs (and their overrides) expanded."""
    values = global_args(dockerfile, build_args, platform_args=platform_args)
    base = stage.base
    image = expand_word(
        base.image, values, escape=dockerfile.escape, file=dockerfile.filename, line=base.line
    )
    if not image:
        raise InvalidInput(
            f"base name ({base.image}) should not be blank",
            hint="declare the ARG before the first FROM or pass it with --build-arg",
            file=dockerfile.filename,
            line=base.line,
        )
    return image


def resolve_platform(
    dockerfile: Dockerfile,
    stage: Stage,
    build_args: Mapping[str, str],
    *,
    platform_args: Mapping[str, str] | None = None,
) -> str | None:
    """The stage's ``FROM --platform`` value expanded like the image, None when absent."""
    base = stage.base
    if base.platform is None:
        return None
    values = global_args(dockerfile, build_args, platform_args=platform_args)
    result = expand_word(
        base.platform, values, escape=dockerfile.escape, file=dockerfile.filename, line=base.line
    )
    if not result:
        raise InvalidInput(
            f"empty platform value from expression {base.platform}",
            file=dockerfile.filename,
            line=base.line,
        )
    return result


def _env_pairs(base_env: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in base_env:
        key, _, value = item.partition("=")
        env[key] = value  # dict assignment keeps a replaced key in its first place
    return env


def resolve_stage(
    dockerfile: Dockerfile,
    stage: Stage,
    base_env: Sequence[str],
    build_args: Mapping[str, str],
    *,
    platform_args: Mapping[str, str] | None = None,
) -> tuple[Resolved, ...]:
    """Expand each instruction of a stage with the ARG/ENV state in force where it stands.

    ``base_env`` is the base image's ``Env`` (``K=V`` strings).  Returns one Resolved per
    instruction of ``stage.instructions``, in order.
    """
    globals_ = global_args(dockerfile, build_args, platform_args=platform_args)
    env = _env_pairs(base_env)
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH
    run_env = dict(env)
    args: dict[str, str] = {}
    out: list[Resolved] = []
    for ins in stage.instructions:

        def ex(word: str, *, _line: int = ins.line) -> str:
            return expand_word(
                word, run_env, escape=dockerfile.escape, file=dockerfile.filename, line=_line
            )

        resolved: Instruction
        if isinstance(ins, Env):
            # All values are expanded with the state before this ENV: `ENV A=1 B=$A`
            # gives B the previous A, as in Docker.
            pairs = tuple((ex(k), ex(v)) for k, v in ins.pairs)
            for key, new in pairs:
                env[key] = new
                run_env[key] = new
            resolved = replace(ins, pairs=pairs)
        elif isinstance(ins, Arg):
            arg_pairs: list[tuple[str, str | None]] = []
            for key, default in ins.pairs:
                value: str | None
                if key in build_args:
                    value = build_args[key]
                elif default is not None:
                    value = ex(default)  # sees the ARGs declared before it, same line included
                else:
                    value = globals_.get(key)
                if value is not None:
                    args[key] = value
                    run_env[key] = value
                arg_pairs.append((key, value))
            resolved = replace(ins, pairs=tuple(arg_pairs))
        else:
            resolved = _expand_instruction(ins, ex, run_env, dockerfile)
        out.append(
            Resolved(
                instruction=resolved,
                env=tuple(env.items()),
                args=tuple(args.items()),
                run_env=tuple(run_env.items()),
            )
        )
    return tuple(out)


def _expand_instruction(
    ins: Instruction,
    ex: Callable[[str], str],
    run_env: Mapping[str, str],
    dockerfile: Dockerfile,
) -> Instruction:
    """Return a copy of a non-ARG/ENV instruction with Docker's expansion applied."""

    def opt(value: str | None) -> str | None:
        return None if value is None else ex(value)

    if isinstance(ins, Copy):
        heredocs = []
        for doc in ins.heredocs:
            data = doc.data
            if doc.expand:
                # BuildKit expands COPY heredoc bodies with a fixed backslash escape and
                # without quote processing: quotes in a file body are content.
                data = expand_word(
                    data,
                    run_env,
                    process_quotes=False,
                    file=dockerfile.filename,
                    line=ins.line,
                )
            heredocs.append(replace(doc, content=data, chomp=False, expand=False))
        return replace(
            ins,
            sources=tuple(ex(s) for s in ins.sources),
            dest=ex(ins.dest),
            from_=opt(ins.from_),
            chown=opt(ins.chown),
            chmod=opt(ins.chmod),
            checksum=opt(ins.checksum),
            exclude=tuple(ex(p) for p in ins.exclude),
            heredocs=tuple(heredocs),
        )
    if isinstance(ins, Label):
        return replace(ins, pairs=tuple((ex(k), ex(v)) for k, v in ins.pairs))
    if isinstance(ins, Workdir):
        return replace(ins, path=ex(ins.path))
    if isinstance(ins, User):
        return replace(ins, user=ex(ins.user))
    if isinstance(ins, Stopsignal):
        return replace(ins, signal=ex(ins.signal))
    if isinstance(ins, Volume):
        return replace(ins, paths=tuple(ex(p) for p in ins.paths))
    if isinstance(ins, Expose):
        ports: list[str] = []
        for port in ins.ports:
            ports.extend(
                expand_words(
                    port, run_env, dockerfile.escape, file=dockerfile.filename, line=ins.line
                )
            )
        return replace(ins, ports=tuple(ports))
    if isinstance(ins, Run):
        return replace(ins, mounts=tuple(ex(m) for m in ins.mounts))
    return ins


def unused_build_args(dockerfile: Dockerfile, build_args: Mapping[str, str]) -> tuple[str, ...]:
    """Names given with ``--build-arg`` that no ARG declares (Docker warns about them)."""
    declared = set(host_platform_args()) | _PROXY_ARGS
    for arg in dockerfile.meta_args:
        declared.update(key for key, _ in arg.pairs)
    for stage in dockerfile.stages:
        for ins in stage.instructions:
            if isinstance(ins, Arg):
                declared.update(key for key, _ in ins.pairs)
    return tuple(sorted(name for name in build_args if name not in declared))
