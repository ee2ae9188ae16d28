"""Rendering ``lbuild diff`` and ``lbuild repro-check`` results: plain text, a rich table on a
terminal, JSON for CI."""

from __future__ import annotations

import json
from typing import Any

from builder.compare.diff import DiffResult, FieldDiff, LayerDiff
from builder.compare.repro import ReproReport, StepSite, summary_rows

__all__ = ["diff_json", "diff_text", "repro_json", "repro_text"]

_MAX_VALUE = 120


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."


def _field_line(f: FieldDiff) -> str:
    a = _short(f.a) if f.a_present else "<absent>"
    b = _short(f.b) if f.b_present else "<absent>"
    note = "  (follows from the other differences)" if f.derived else ""
    return f"{f.field}: {a} -> {b}{note}"


def _abbrev(value: Any) -> str:
    text = str(value)
    return text[7:19] if text.startswith("sha256:") else _short(value)


def _layer_lines(ld: LayerDiff, site: StepSite | None, limit: int | None) -> list[str]:
    head = f"layer {ld.index}"
    if site is not None:
        head += f" ({site})"
    if ld.a is None or ld.b is None:
        side = "B" if ld.a is None else "A"
        return [f"{head}: only in {side}"]
    derived = [f for f in ld.fields if f.derived]
    if derived:
        head += ": " + ", ".join(f"{f.field} {_abbrev(f.a)} -> {_abbrev(f.b)}" for f in derived)
    lines = [head]
    lines += [f"  {_field_line(f)}" for f in ld.fields if not f.derived]
    files = ld.files if limit is None else ld.files[:limit]
    for fd in files:
        if fd.status == "changed":
            how = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in fd.changes)
            lines.append(f"  changed {fd.path} ({fd.type}): {how}")
        else:
            lines.append(f"  {fd.status:<7} {fd.path} ({fd.type})")
    if limit is not None and len(ld.files) > limit:
        lines.append(f"  ... and {len(ld.files) - limit} more files (--format json lists all)")
    if ld.order:
        o = ld.order
        lines.append(
            f"  entry order differs: {o['first']} is entry {o['a_position']} in A, "
            f"{o['b_position']} in B (where B has {o['b_has_there']})"
        )
    return lines


def diff_text(
    d: DiffResult,
    sites: dict[int, StepSite | None] | None = None,
    limit: int | None = None,
) -> str:
    """The human form of a diff (empty sections left out)."""
    lines = [
        f"A: {d.a.ref} ({d.a.manifest_digest or d.a.config_digest})",
        f"B: {d.b.ref} ({d.b.manifest_digest or d.b.config_digest})",
    ]
    if d.equal:
        lines.append("images are equal" + (" (under the ignore options)" if d.options.any else ""))
    for title, rows in (("index", d.index), ("manifest", d.manifest), ("config", d.config)):
        shown = [f for f in rows if not f.derived] or rows
        if shown:
            lines.append(f"{title}:")
            lines += [f"  {_field_line(f)}" for f in shown]
    for ld in d.layers:
        if ld.fields or ld.counts:
            lines += _layer_lines(ld, (sites or {}).get(ld.index), limit)
    return "\n".join(lines)


def diff_json(d: DiffResult) -> str:
    return json.dumps(d.to_json(), indent=2, sort_keys=False, default=str)


# ---------------------------------------------------------------------------------------------
# repro-check


def _sites(report: ReproReport, d: DiffResult) -> dict[int, StepSite | None]:
    return {ld.index: report.site_of_layer(d, ld.index) for ld in d.layers}


def repro_json(report: ReproReport) -> str:
    out: dict[str, Any] = {
        "reproducible": report.reproducible,
        "against": report.against,
        "runs": [
            {
                "index": r.index,
                "variations": r.used,
                "seconds": round(r.seconds, 3),
                "context": str(r.context),
            }
            for r in report.runs
        ],
        "comparisons": [],
    }
    if report.work is not None:
        out["work"] = str(report.work)
    for i, d in report.diffs:
        first = report.first_step(d)
        entry = d.to_json()
        entry["run"] = i
        entry["first_difference"] = None
        if first is not None:
            what, site = first
            entry["first_difference"] = {
                "where": what,
                "file": site.file if site else None,
                "line": site.line if site else None,
                "instruction": site.text if site else None,
            }
        for field_entry, f in zip(entry["config"], d.config, strict=True):
            cs = report.site_of_config(f) if f.field.startswith("config.") else None
            if f.field.startswith("history["):
                cs = report.site_of_history(d, int(f.field[8 : f.field.index("]")]))
            if cs is not None:
                field_entry["step"] = {"file": cs.file, "line": cs.line, "instruction": cs.text}
        for layer in entry["layers"]:
            site = report.site_of_layer(d, layer["index"])
            layer["step"] = (
                {"file": site.file, "line": site.line, "instruction": site.text} if site else None
            )
        out["comparisons"].append(entry)
    return json.dumps(out, indent=2, default=str)


def repro_text(report: ReproReport, rich_table: bool = False) -> str:
    """A short human summary; the table of runs is drawn with rich when ``rich_table``."""
    lines: list[str] = []
    base = report.against or "build 0"
    if rich_table:
        lines.append(_rich_runs(report))
    else:
        for run, used, secs in summary_rows(report):
            lines.append(f"build {run} ({secs}): {used}")
    for i, d in report.diffs:
        other = "build 0" if report.against else f"build {i}"
        if d.equal:
            lines.append(f"{other} = {base}: {d.b.manifest_digest}")
            continue
        lines.append(f"{other} differs from {base}:")
        first = report.first_step(d)
        if first is not None:
            what, site = first
            lines.append(f"  first difference: {site if site else what} ({what})")
        body = diff_text(d, _sites(report, d), limit=20).splitlines()[2:]
        lines += ["  " + ln for ln in body]
    verdict = "reproducible" if report.reproducible else "NOT reproducible"
    lines.append(
        f"{verdict}: {len(report.runs)} build(s)"
        + (f" against {report.against}" if report.against else "")
    )
    if report.work is not None:
        lines.append(f"builds kept in {report.work}")
    return "\n".join(lines)


def _rich_runs(report: ReproReport) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="repro-check builds")
    table.add_column("build")
    table.add_column("variations")
    table.add_column("time", justify="right")
    table.add_column("image")
    digests: dict[int, str] = {}
    for i, d in report.diffs:
        if report.against is None:
            digests[0] = d.a.manifest_digest or ""
        digests[i] = d.b.manifest_digest or ""
    for run, used, secs in summary_rows(report):
        table.add_row(run, used, secs, (digests.get(int(run)) or "")[:19])
    console = Console(width=120, record=True, force_terminal=True)
    with console.capture() as cap:
        console.print(table)
    return cap.get().rstrip("\n")
