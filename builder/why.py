"""``lbuild why``: explain a cache miss by comparing a step's inputs with its last record.

Like doit's "reasons", the answer is a list of sentences a user understands:
"COPY src/ /app: src/main.py content changed", "src/run.sh mode 0644 -> 0755",
"ENV PATH changed", "parent step changed", "new step".
"""

from __future__ import annotations

import json
import posixpath
from typing import Any


def _sources(rows: list[list[Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    name = ""
    for row in rows:
        if row and row[0] == "src":
            name = str(row[1])
            continue
        rel = str(row[0])
        path = posixpath.join(name, rel) if rel else name
        out[path] = row
    return out


def _env(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        out[k] = v
    return out


def _diff_sources(old: list[list[Any]], new: list[list[Any]]) -> list[str]:
    a, b = _sources(old), _sources(new)
    reasons: list[str] = []
    for path in sorted(set(a) | set(b)):
        o, n = a.get(path), b.get(path)
        if o is None:
            reasons.append(f"{path} added")
        elif n is None:
            reasons.append(f"{path} removed")
        elif o != n:
            # row: rel, type, mode, digest, link, size, uid, gid, mtime, link_group
            if o[1] != n[1]:
                reasons.append(f"{path} type {o[1]} -> {n[1]}")
                continue
            if o[3] != n[3] or o[5] != n[5]:
                reasons.append(f"{path} content changed")
            if o[2] != n[2]:
                reasons.append(f"{path} mode {o[2]:04o} -> {n[2]:04o}")
            if o[4] != n[4]:
                reasons.append(f"{path} symlink target {o[4]!r} -> {n[4]!r}")
            if o[8] != n[8]:
                reasons.append(f"{path} mtime changed")
            if o[9] != n[9]:
                reasons.append(f"{path} hardlinks changed")
    return reasons


def explain(old: dict[str, Any] | None, new: dict[str, Any], label: str) -> list[str]:
    """Reasons why ``new`` misses where ``old`` (the last record of the same step) was built."""
    if old is None:
        return ["new step"]
    new = json.loads(json.dumps(new))  # tuples -> lists, as the stored inputs went through JSON
    reasons: list[str] = []
    oi, ni = old.get("instruction") or {}, new.get("instruction") or {}
    op = str(new.get("op", ""))
    if oi.get("type") != ni.get("type"):
        # the type names are the dataclass names (Copy, Label): say them as written
        return [
            f"instruction changed: {str(oi.get('type')).upper()} -> {str(ni.get('type')).upper()}"
        ]
    if op in ("ENV", "ARG") and oi != ni:
        o_env = {str(p[0]): p[1] for p in oi.get("pairs", [])}
        n_env = {str(p[0]): p[1] for p in ni.get("pairs", [])}
        what = "ENV" if op == "ENV" else "build arg"
        for k in sorted(set(o_env) | set(n_env)):
            if o_env.get(k) != n_env.get(k):
                reasons.append(f"{what} {k} changed")
    elif oi != ni:
        fields = sorted(k for k in set(oi) | set(ni) if oi.get(k) != ni.get(k))
        reasons.append(f"{label}: instruction changed ({', '.join(fields)})")
    if old.get("sources") != new.get("sources"):
        reasons += [
            f"{label}: {r}"
            for r in _diff_sources(old.get("sources") or [], new.get("sources") or [])
        ]
    if old.get("binds") != new.get("binds"):
        ob = {str(b[0]): b[1] for b in old.get("binds") or []}
        nb = {str(b[0]): b[1] for b in new.get("binds") or []}
        for target in sorted(set(ob) | set(nb)):
            if ob.get(target) != nb.get(target):
                changes = _diff_sources(ob.get(target) or [], nb.get(target) or [])
                reasons += [f"{label}: bind mount {target}: {r}" for r in changes]
    os_, ns = old.get("state") or {}, new.get("state") or {}
    if os_ != ns:
        oe, ne = _env(os_.get("env", [])), _env(ns.get("env", []))
        for k in sorted(set(oe) | set(ne)):
            if oe.get(k) != ne.get(k):
                reasons.append(f"ENV {k} changed")
        oa, na = dict(map(tuple, os_.get("args", []))), dict(map(tuple, ns.get("args", [])))
        for k in sorted(set(oa) | set(na)):
            if oa.get(k) != na.get(k):
                reasons.append(f"build arg {k} changed")
        for k in ("workdir", "user", "shell", "platform"):
            if os_.get(k) != ns.get(k):
                reasons.append(f"{k} changed: {os_.get(k)!r} -> {ns.get(k)!r}")
    for k in ("workdir", "multi", "epoch"):
        if old.get(k) != new.get(k):
            reasons.append(f"{k} changed: {old.get(k)!r} -> {new.get(k)!r}")
    if old.get("from") != new.get("from"):
        what = "base image" if "image" in (new.get("from") or {}) else "source stage"
        reasons.append(f"{what} of --from changed")
    if old.get("format") != new.get("format"):
        reasons.append("lbuild's layer format changed")
    if not reasons and old.get("parent") != new.get("parent"):
        reasons.append("parent step changed")
    if not reasons and old != new:
        reasons.append("inputs changed")
    return reasons
