"""The command line's habits (issue 15): what argparse alone gets wrong, and the values of the
build flags that are not options of a build.

- no abbreviations (``--prog plain`` must not mean ``--progress``): :class:`Parser`;
- an unknown subcommand, a `docker build` flag lbuild does not have, a build flag given to
  ``plan``/``why`` or an unknown option is refused before argparse reads the line (it would
  take the flag's value for CONTEXT), with the subcommand's usage and a "did you mean":
  :func:`check_flags`;
- ``-f -`` (the Dockerfile from stdin), ``Containerfile`` as the default: :func:`dockerfile_path`;
- ``-t`` and ``lbuild tag`` names as Docker validates them: :func:`checked_tag`;
- ``--annotation``: :func:`parse_annotations`; ``-q``, ``--iidfile``, ``--metadata-file``:
  :func:`write_result`.

Imported by every command: the standard library only at the top.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

DEFAULT_DEBOUNCE_MS = 50
"""``lbuild watch --debounce``: quiet period before a rebuild."""
DEFAULT_EXEC_GRACE_S = 5.0
"""``lbuild watch --exec-grace``: SIGTERM to SIGKILL delay when stopping the command."""

# The flags of `docker build` and `docker buildx build` (true: takes a value).  One that the
# subcommand's parser does not define is "not supported yet" (exit 2), not an unknown option.
DOCKER_BUILD_FLAGS: dict[str, bool] = {
    "--add-host": True,
    "--allow": True,
    "--annotation": True,
    "--attest": True,
    "--build-arg": True,
    "--build-context": True,
    "--builder": True,
    "--cache-from": True,
    "--cache-to": True,
    "--call": True,
    "--cgroup-parent": True,
    "--check": False,
    "--compress": False,
    "--cpu-period": True,
    "--cpu-quota": True,
    "-c": True,
    "--cpu-shares": True,
    "--cpuset-cpus": True,
    "--cpuset-mems": True,
    "--debug": False,
    "--disable-content-trust": False,
    "-f": True,
    "--file": True,
    "--force-rm": False,
    "--iidfile": True,
    "--isolation": True,
    "--label": True,
    "--load": False,
    "-m": True,
    "--memory": True,
    "--memory-swap": True,
    "--metadata-file": True,
    "--network": True,
    "--no-cache": False,
    "--no-cache-filter": True,
    "-o": True,
    "--output": True,
    "--platform": True,
    "--progress": True,
    "--provenance": True,
    "--pull": False,
    "--push": False,
    "-q": False,
    "--quiet": False,
    "--rm": False,
    "--sbom": True,
    "--secret": True,
    "--security-opt": True,
    "--shm-size": True,
    "--squash": False,
    "--ssh": True,
    "--stream": False,
    "-t": True,
    "--tag": True,
    "--target": True,
    "--ulimit": True,
}
# Subcommands that take the build flags: a docker flag they lack is "not supported yet".
BUILDING = ("build", "watch", "plan", "why", "repro-check")


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class Version(argparse.Action):
    """``--version``: the installed distribution's version (read only when asked)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from importlib import metadata

        try:
            version = metadata.version("lbuild-oci")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        print(f"lbuild {version}")
        parser.exit()


def subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean X?)`` when one of ``choices`` is close to ``word``, else ``""``."""
    from builder.frontend.suggest import did_you_mean as suggest

    return suggest(word, choices)


def usage_error(p: argparse.ArgumentParser, message: str) -> None:
    """The subcommand's usage, then ``message`` as one line; exit 2."""
    p.print_usage(sys.stderr)
    print(message, file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _command(
    p: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.ArgumentParser, str, list[str]] | None:
    """The (sub)subcommand's parser, its name and the arguments after it."""
    subs = subcommands(p)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    if i >= len(argv):
        return None
    cmd = argv[i]
    if cmd not in subs:
        usage_error(p, f"lbuild: unknown command {cmd!r}{did_you_mean(cmd, sorted(subs))}")
    sp, name, rest = subs[cmd], cmd, list(argv[i + 1 :])
    nested = subcommands(sp)
    if nested:
        j = 0
        while j < len(rest) and rest[j].startswith("-"):
            j += 1
        if j < len(rest):
            if rest[j] not in nested:
                usage_error(
                    sp,
                    f"lbuild {cmd}: unknown command {rest[j]!r}"
                    f"{did_you_mean(rest[j], sorted(nested))}",
                )
            sp, name, rest = nested[rest[j]], f"{cmd} {rest[j]}", rest[j + 1 :]
    return sp, name, rest


def check_flags(p: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Refuse what argparse would misread, before it reads."""
    found = _command(p, argv)
    if found is None:
        return
    sp, name, rest = found
    known = sp._option_string_actions
    build = subcommands(p).get("build")
    j = 0
    while j < len(rest):
        tok = rest[j]
        j += 1
        if tok == "--":
            break
        if not tok.startswith("-") or tok == "-" or tok[1:2].isdigit():
            continue
        flag = tok.split("=", 1)[0] if tok.startswith("--") else tok[:2]
        attached = "=" in tok if tok.startswith("--") else len(tok) > 2
        action = known.get(flag)
        if action is not None:
            if action.nargs != 0 and not attached:
                j += 1  # its value, whatever it looks like
            continue
        if build is not None and name in BUILDING and flag in build._option_string_actions:
            usage_error(sp, f"lbuild {name}: {flag} does not apply to {name}")
        if name in BUILDING and flag in DOCKER_BUILD_FLAGS:
            usage_error(sp, f"lbuild {name}: {flag} is not supported yet")
        longs = [o for o in known if o.startswith("--")]
        usage_error(sp, f"lbuild {name}: unknown option {flag}{did_you_mean(flag, longs)}")


def parse(p: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``check_flags``, then argparse; leftover arguments get the subcommand's usage."""
    check_flags(p, argv)
    ns, extra = p.parse_known_args(argv)
    if extra:
        sp = subcommands(p)[ns.command]
        nested = subcommands(sp)
        sub = getattr(ns, "cache_command", None)
        if nested and sub in nested:
            sp = nested[sub]
        usage_error(sp, f"{sp.prog}: unrecognized arguments: {' '.join(extra)}")
    return ns


# ---------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------
def checked_tag(name: str) -> str:
    """``-t`` / ``lbuild tag``: Docker's reference rules (``foo::bar``, upper case refused)."""
    from cache.registry.reference import parse as parse_ref

    if parse_ref(name).digest is not None:
        from cache.errors import InvalidInput

        raise InvalidInput(f"invalid tag {name!r}: a tag cannot name a digest")
    return name


def parse_annotations(items: Sequence[str]) -> dict[str, str]:
    """``--annotation KEY=VALUE`` or ``manifest:KEY=VALUE`` (buildx's spelling), on the image
    manifest; other targets (``index:``, ``manifest-descriptor:``, ``[platform]``) are not
    supported yet."""
    from cache.errors import InvalidInput, Unsupported

    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if ":" in key:
            where, _, key = key.partition(":")
            if where != "manifest":
                raise Unsupported(
                    f"--annotation {where}:{key}=...: {where} annotations are not supported yet "
                    "(manifest annotations are)"
                )
        if not sep or not key:
            raise InvalidInput(f"invalid --annotation {item!r}: expected [manifest:]KEY=VALUE")
        out[key] = value
    return out


_STDIN_DIRS: list[str] = []


def context_path(given: str) -> Path:
    """The build context directory.  Docker's other forms of CONTEXT, a tar or Dockerfile
    read from stdin (``-``) and a remote URL (git or a tarball), are exit 2 "not supported
    yet" naming them, not "build context not found"."""
    from cache.errors import Unsupported

    if given == "-":
        raise Unsupported(
            "a build context read from stdin (CONTEXT -) is not supported yet: give a "
            "directory (-f - reads the Dockerfile alone from stdin)"
        )
    path = Path(given)
    remote = "://" in given or given.startswith(("git@", "github.com/"))
    if remote and not path.is_dir():
        raise Unsupported(
            f"a remote build context ({given}) is not supported yet: give a directory"
        )
    return path


def dockerfile_path(given: str | None, context: Path) -> Path | None:
    """``-f``: as given; ``-`` is stdin, kept in a temporary file until :func:`cleanup`;
    without ``-f``, ``CONTEXT/Dockerfile``, else ``CONTEXT/Containerfile`` (as buildah and
    podman)."""
    if given == "-":
        import tempfile

        d = tempfile.mkdtemp(prefix="lbuild-stdin-")
        _STDIN_DIRS.append(d)
        path = Path(d) / "Dockerfile"
        path.write_bytes(sys.stdin.buffer.read())
        from builder.frontend.names import STDIN, show_as

        show_as(path, STDIN)  # messages name it as the user did, never the temporary file
        return path
    if given:
        return Path(given)
    if not (context / "Dockerfile").exists() and (context / "Containerfile").exists():
        return context / "Containerfile"
    return None


def cleanup() -> None:
    """Remove the temporary files ``-f -`` made."""
    for d in _STDIN_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    _STDIN_DIRS.clear()


def write_result(ns: argparse.Namespace, result: Any) -> None:
    """``-q`` (the image ID on stdout), ``--iidfile``, ``--metadata-file``.  The image ID is
    the config digest, as Docker's; the manifest digest is ``containerimage.digest``."""
    if getattr(ns, "iidfile", None) is not None:
        ns.iidfile.write_text(result.config_digest)
    if getattr(ns, "metadata_file", None) is not None:
        import json

        meta: dict[str, Any] = {
            "containerimage.digest": result.manifest_digest,
            "containerimage.config.digest": result.config_digest,
            "lbuild.steps": {
                "total": result.steps_total,
                "cached": result.steps_cached,
                "built": result.steps_total - result.steps_cached,
            },
        }
        if getattr(ns, "tags", None):
            meta["image.name"] = ",".join(ns.tags)
        ns.metadata_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if getattr(ns, "quiet", False):
        print(result.config_digest)
