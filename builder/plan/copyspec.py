"""COPY and ADD: which entries a step writes, following Docker's rules.

Sources come from the build context or from another stage's merged view; both are turned
into ``Selected`` items (a top-level source and everything below it) before the
destination rules are applied, so the rules are written once.  Every question asked of
the destination image (does /app exist, is it a directory) is recorded in ``facts``:
together with the sources and flags they decide the layer's bytes, which lets the solver
reuse a layer whose step key changed only because an earlier step did.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from cache.errors import InvalidInput, NotFound
from cache.layers.view import View, clean
from cache.types import Entry, direct_init


@direct_init
@dataclass(frozen=True)
class Item:
    """One file below a selected source; ``rel`` is relative to the source ('' = the source itself)."""

    rel: str
    entry: Entry  # path is ignored; type/mode/uid/gid/size/digest/link/mtime/source are used
    hardlink_key: tuple[int, int] | None = None


@dataclass(frozen=True)
class Selected:
    """One matched source: its base name and its items (the source itself first)."""

    name: str
    is_dir: bool
    items: tuple[Item, ...]
    archive: bool = False


@dataclass
class CopyResult:
    entries: list[Entry]
    facts: dict[str, Any] = field(default_factory=dict)


def has_wildcard(s: str) -> bool:
    """An unescaped ``*``, ``?`` or ``[`` (the one rule of context and ``--from`` sources)."""
    from builder.frontend.dockerignore import has_wildcards

    return has_wildcards(s)


def parse_chmod(spec: str | None, file: str, line: int) -> int | None:
    if spec is None:
        return None
    if not re.fullmatch(r"[0-7]{3,4}", spec):
        raise InvalidInput(
            f"invalid --chmod value {spec!r}: expected an octal mode such as 0755",
            file=file,
            line=line,
        )
    return int(spec, 8)


def db_entry(text: str, name: str) -> list[str] | None:
    """The ``:``-separated fields of the /etc/passwd or /etc/group line for ``name``."""
    for raw in text.splitlines():
        parts = raw.split(":")
        if parts and parts[0] == name:
            return parts
    return None


def _ids(parts: list[str] | None, *fields: int) -> tuple[int, ...] | None:
    """Numeric fields of a passwd/group entry (None when missing or not numbers)."""
    if parts is None or len(parts) <= max(fields):
        return None
    try:
        return tuple(int(parts[f]) for f in fields)
    except ValueError:
        return None


def resolve_chown(
    spec: str | None, read_file: Callable[[str], bytes | None], file: str, line: int
) -> tuple[int, int] | None:
    """``--chown`` to (uid, gid): numbers as given, names through the image's /etc/passwd and /etc/group."""
    if spec is None or spec == "":
        return None
    user, sep, group = spec.partition(":")
    if user.isdigit():
        uid = int(user)
        primary = uid
    else:
        passwd = (read_file("etc/passwd") or b"").decode(errors="replace")
        found = _ids(db_entry(passwd, user), 2, 3)
        if found is None:
            raise InvalidInput(
                f"unable to convert uid/gid chown string to host mapping: user {user!r} "
                "not found in /etc/passwd",
                file=file,
                line=line,
            )
        uid, primary = found
    if not sep:
        # Docker: a user without a group uses the same numeric id as the gid for numbers,
        # and the user's primary group for names.
        return uid, primary
    if group.isdigit():
        return uid, int(group)
    groups = (read_file("etc/group") or b"").decode(errors="replace")
    g = _ids(db_entry(groups, group), 2)
    if g is None:
        raise InvalidInput(
            f"unable to convert uid/gid chown string to host mapping: group {group!r} "
            "not found in /etc/group",
            file=file,
            line=line,
        )
    return uid, g[0]


# --- sources from another stage's merged view ------------------------------------------------


def glob_view(
    view: View, pattern: str, file: str | None = None, line: int | None = None
) -> list[str]:
    """Paths in ``view`` matching ``pattern`` segment by segment.

    The one wildcard matcher of context sources too (Go's ``filepath.Match``:
    ``builder.frontend.dockerignore.compile_segment``), so ``[^x]*`` means "not x" here as
    there, and a malformed pattern is an error rather than a literal.
    """
    from builder.frontend.dockerignore import PatternSyntaxError, compile_segment
    from builder.frontend.dockerignore import has_wildcards as go_has_wildcards

    parts = [p for p in clean(pattern).split("/") if p]
    current = [""]
    for seg in parts:
        nxt: list[str] = []
        if not go_has_wildcards(seg):
            literal = re.sub(r"\\(.)", r"\1", seg, flags=re.DOTALL)
            for base in current:
                cand = posixpath.join(base, literal) if base else literal
                if view.exists(view.resolve(cand, follow_last=False)) or view.exists(cand):
                    nxt.append(cand)
            current = nxt
            continue
        try:
            regex = compile_segment(seg)
        except PatternSyntaxError as err:
            raise InvalidInput(
                f"bad COPY source pattern {pattern!r}: {err}", file=file, line=line
            ) from None
        for base in current:
            real = view.resolve(base) if base else ""
            for child in sorted(view.children.get(real, ())):
                name = posixpath.basename(child)
                if regex.fullmatch(name):
                    nxt.append(posixpath.join(base, name) if base else name)
        current = nxt
    return current


def select_from_view(view: View, sources: Iterable[str], file: str, line: int) -> list[Selected]:
    """Resolve COPY --from sources in a stage's view into Selected items."""
    out: list[Selected] = []
    for src in sources:
        matches = glob_view(view, src, file, line) if has_wildcard(src) else [clean(src)]
        if not matches:
            raise NotFound(f"COPY source not found in stage: {src}", file=file, line=line)
        for m in matches:
            real = view.resolve(m)
            e = view.get(real)
            if e is None and not view.is_dir(real):
                raise NotFound(f"COPY source not found in stage: {src}", file=file, line=line)
            name = posixpath.basename(m) or "."
            if view.is_dir(real):
                top = e or Entry(path=real, type="dir", mode=0o755)
                items = [Item("", top)]
                inside = real + "/" if real else ""
                for sub in view.walk(real):
                    rel = sub.path[len(inside) :]
                    if sub.type == "hardlink" and not clean(sub.link).startswith(inside):
                        sub = _link_target(view, sub)
                    items.append(Item(rel, sub))
                out.append(Selected(name, True, tuple(items)))
            else:
                assert e is not None
                if e.type == "hardlink":
                    e = _link_target(view, e)
                out.append(Selected(name, False, (Item("", e),)))
    return out


def _link_target(view: View, e: Entry) -> Entry:
    """A hardlink whose target is not copied with it becomes a copy of that target's file.

    The result keeps the target's path (where its bytes are) and the link's own metadata."""
    target = view.get(clean(e.link))
    if target is None or target.type != "file":
        return e
    return replace(target, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime, xattrs=e.xattrs)


# --- the destination rules ---------------------------------------------------------------------


def plan_copy(
    selected: list[Selected],
    *,
    dest: str,
    workdir: str,
    multi: bool,
    view: View | None,
    chown: tuple[int, int] | None,
    chmod: int | None,
    mtime: int | None,
    keep_ownership: bool,
    file: str,
    line: int,
) -> CopyResult:
    """Turn selected sources into layer entries at ``dest``.

    ``multi`` is True when the instruction had several sources or a wildcard; ``view`` is the
    parent's merged view (None for ``--link``: the destination is then judged on its own);
    ``mtime`` None keeps each item's own mtime (``--keep-mtime``, archives).
    """
    dest_abs = dest if dest.startswith("/") else posixpath.join(workdir or "/", dest)
    trailing = dest.endswith("/") or dest.endswith("/.") or dest in (".", "")
    cp = _CopyPlan(view, chown, chmod, mtime, file, line, clean(dest_abs))
    if (
        multi
        and not trailing
        and not cp.view_is_dir(cp.dest_path)
        and (len(selected) > 1 or any(s.is_dir for s in selected))
    ):
        raise InvalidInput(
            "When using COPY with more than one source file, the destination "
            "must be a directory and end with a /",
            file=file,
            line=line,
        )
    # Resolve symlinked destination directories inside the image (non-link only).
    if view is not None and cp.dest_path:
        real = view.resolve(cp.dest_path)
        if real != cp.dest_path:
            cp.facts[f"resolve:{cp.dest_path}"] = real
            cp.dest_path = real
    for sel in selected:
        # Ownership: a stage's files keep theirs (as an archive's do, unlike the context's).
        keep = keep_ownership or sel.archive
        if sel.is_dir or sel.archive:
            cp.place_tree(sel, keep)
        else:
            into_dir = trailing or multi or cp.view_is_dir(cp.dest_path)
            target = posixpath.join(cp.dest_path, sel.name) if into_dir else cp.dest_path
            if not target:
                raise InvalidInput("cannot copy a file onto /", file=file, line=line)
            cp.ensure_dirs(target)
            cp.emit(sel.items[0], target, keep)
    return CopyResult(sorted(cp.out.values(), key=lambda e: e.path.split("/")), cp.facts)


@dataclass
class _CopyPlan:
    """The entries one COPY/ADD makes, and the facts about its destination it relied on
    (``facts``: what the parent's view answered, part of the layer's content key)."""

    view: View | None
    owner: tuple[int, int] | None
    chmod: int | None
    mtime: int | None
    file: str
    line: int
    dest_path: str
    facts: dict[str, Any] = field(default_factory=dict)
    out: dict[str, Entry] = field(default_factory=dict)
    hardlinks: dict[tuple[int, int], str] = field(default_factory=dict)
    # Where each source path of the current selection lands: a hardlink read from a stage or
    # an archive names its target by source path, and must name the target's copy instead.
    landed: dict[str, str] = field(default_factory=dict)

    def view_is_dir(self, p: str) -> bool:
        if self.view is None:
            return False
        r = self.view.resolve(p)
        ans = self.view.is_dir(r)
        self.facts[f"isdir:{p}"] = [r, ans]
        return ans

    def view_exists(self, p: str) -> bool:
        if self.view is None:
            return False
        ans = self.view.exists(self.view.resolve(p))
        self.facts[f"exists:{p}"] = ans
        return ans

    def put(self, e: Entry) -> None:
        self.out[e.path] = e

    def not_a_dir(self, p: str) -> None:
        raise InvalidInput(
            f"cannot copy to /{self.dest_path}: /{p} is not a directory",
            file=self.file,
            line=self.line,
        )

    def existing_dir(self, p: str) -> Entry:
        """Directory ``p`` of the parent image as it is (``view`` is not None here)."""
        assert self.view is not None
        e = self.view.get(p)
        if e is None:  # implicit: a lower layer's tar named children but not the directory
            e = Entry(path=p, type="dir", mode=0o755)
        self.facts[f"meta:{p}"] = [
            e.mode, e.uid, e.gid, e.mtime, [[k, v.hex()] for k, v in e.xattrs]
        ]
        return replace(e, path=p, offset=-1, source=None)

    def ensure_dirs(self, path: str) -> None:
        """Create missing parent directories of ``path`` (0755, root or --chown owner)."""
        parts = path.split("/")[:-1] if path else []
        cur = ""
        for p in parts:
            cur = f"{cur}/{p}" if cur else p
            if cur in self.out:
                if self.out[cur].type != "dir":
                    self.not_a_dir(cur)
                continue
            if self.view_exists(cur):
                # A file where a directory must be: Docker refuses, and a layer with
                # entries below a file is one no runtime can unpack.
                if not self.view_is_dir(cur):
                    self.not_a_dir(cur)
                # The layer carries the existing directory with the metadata it has (as
                # BuildKit's differ does), so applying it never changes the directory.
                self.put(self.existing_dir(cur))
                continue
            uid, gid = self.owner if self.owner else (0, 0)
            self.put(
                Entry(path=cur, type="dir", mode=0o755, uid=uid, gid=gid, mtime=self.mtime or 0)
            )

    def emit(self, item: Item, target: str, keep: bool, own_time: bool = False) -> None:
        src = item.entry
        uid, gid = (src.uid, src.gid) if keep else (0, 0)
        if self.owner is not None:
            uid, gid = self.owner
        mode = src.mode
        if self.chmod is not None and src.type in ("file", "dir", "hardlink"):
            mode = self.chmod
        e = replace(
            src,
            path=target,
            uid=uid,
            gid=gid,
            mode=mode,
            mtime=src.mtime if self.mtime is None or own_time else self.mtime,
            offset=-1,
        )
        if src.type == "symlink":
            e = replace(e, mode=0o777)
        if item.hardlink_key is not None and src.type == "file":
            first = self.hardlinks.get(item.hardlink_key)
            if first is not None:
                e = replace(e, type="hardlink", link=first, size=0, digest="", source=None)
            else:
                self.hardlinks[item.hardlink_key] = target
        if src.type == "hardlink":
            to = self.landed.get(clean(src.link))
            if to is None:
                raise InvalidInput(
                    f"hardlink {src.path} points to {src.link}, which is not copied with it",
                    file=self.file,
                    line=self.line,
                )
            e = replace(e, link=to, size=0, digest="", source=None)
        self.put(e)

    def place_tree(self, sel: Selected, keep: bool) -> None:
        """A directory's contents (or an archive's members) below the destination."""
        base = self.dest_path
        self.ensure_dirs(base + "/x" if base else "x")
        self.landed.clear()
        for item in sel.items:
            if item.rel and item.entry.type in ("file", "hardlink"):
                self.landed[clean(item.entry.path)] = posixpath.join(base, item.rel)
        for item in sel.items:
            if item.rel == "":
                # The destination directory is never a copy of the source directory:
                # BuildKit creates it 0755 (owned by --chown) when missing and leaves an
                # existing one alone (ensure_dirs above put it in the layer as it is);
                # --chmod gives the mode of a directory it creates (moby/buildkit#585,
                # #4945), never one that exists (issue 9).
                made = base in self.out and not (self.view is not None and self.view_exists(base))
                if base and self.chmod is not None and not sel.archive and made:
                    uid, gid = self.owner if self.owner else (0, 0)
                    self.put(
                        Entry(
                            path=base,
                            type="dir",
                            mode=self.chmod,
                            uid=uid,
                            gid=gid,
                            mtime=self.mtime or 0,
                        )
                    )
                continue
            # An archive's members keep their own times, as docker's ADD does: they are
            # part of the archive's bytes, hence of the key, so the layer stays a pure
            # function of its key.
            self.emit(
                item,
                posixpath.join(base, item.rel) if base else item.rel,
                keep,
                own_time=sel.archive,
            )


def merkle(selected: list[Selected]) -> list[list[Any]]:
    """Canonical description of the selected sources: names, types, modes, content digests,
    link targets, hardlink groups and extended attributes (only when a file has any).
    Context items carry uid/gid 0 and mtime 0 (unless ``--keep-mtime``), so no host path,
    inode, owner or mtime reaches a step key."""
    rows: list[list[Any]] = []
    groups: dict[tuple[int, int], str] = {}
    for sel in selected:
        rows.append(["src", sel.name, sel.is_dir, sel.archive])
        for it in sel.items:
            e = it.entry
            link_group = ""
            if it.hardlink_key is not None:
                link_group = groups.setdefault(it.hardlink_key, f"{sel.name}/{it.rel}")
            rows.append(
                [
                    it.rel,
                    e.type,
                    e.mode,
                    e.digest,
                    e.link,
                    e.size,
                    e.uid,
                    e.gid,
                    e.mtime,
                    link_group,
                    # only when there are any: keys of files without xattrs stay as they were
                    *([[[n, v.hex()] for n, v in e.xattrs]] if e.xattrs else []),
                ]
            )
    return rows


def chown_is_named(spec: str | None) -> bool:
    """True when ``--chown`` names a user or group (resolved through the image's files)."""
    if not spec:
        return False
    user, _, group = spec.partition(":")
    return not user.isdigit() or (bool(group) and not group.isdigit())
