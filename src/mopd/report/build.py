"""Render a run's report from its run directory alone (no model loading) and write it.

Reads RUN/run.json, RUN/<stage>/metrics.jsonl and RUN/<stage>/final/mopd.json (through
:mod:`mopd.report.tables`, which computes the numbers); writes, each atomically (temp file in RUN/, then
os.replace): report.md, report.html, summary.json and the curve PNGs (reward.png, reverse_kl.png,
entropy.png, completion_len.png, routing_share.png, is_dropped.png, teacher_nll.png; a figure with no data
is not written). Each MOPD stage's RUN/<stage>/preflight.json (the teacher-student compatibility check)
becomes a "Teacher preflight" table.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mopd.report.plots import FIGURE_NAMES, render_figures
from mopd.report.tables import Table, compute_report, fmt_duration, fmt_number, incomplete_message

from ..core.run_dir import RECIPE_COPY, REPORT_HTML, REPORT_MD, SUMMARY_JSON
from ..eval.transcripts import render

# ----------------------------------------------------------------------------------------------- write


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def build_report(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Rebuild report.md, report.html, summary.json and the curve PNGs of `run_dir` in `out` (default: `run_dir`
    itself; elsewhere when the run is on a read-only mount); returns the summary.

    Raises ValueError (one line, naming the file) when run.json is missing or lacks required keys, and OSError
    when `out` cannot be written (each file is replaced whole, so nothing already there is damaged).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    data = compute_report(run_dir)
    pngs = render_figures(data.curves, data.order, data.recipe)
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_NAMES:
        target = out / name
        if name in pngs:
            atomic_write(target, pngs[name])
        else:  # remove a stale figure from an earlier build so the report never links old data
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    header = _header(data.run, data.recipe, data.wall, (run_dir / RECIPE_COPY).is_file())
    if incomplete := incomplete_message(data.summary):
        header += f" **Incomplete:** {incomplete}; their scores are missing below."
    title = f"MOPD report: {data.recipe} ({fmt_duration(data.wall)} wall)"
    main, norm, preflight = data.recovery_table, data.norm, data.preflight_table
    stage_tbl, acc_tbl = data.stage_table, data.accuracy_table
    for msg in data.summary["warnings"]:  # above the table: a domain left out of the normalized score
        header += f" **Warning:** {msg}."
    md = _markdown(title, header, main, norm, stage_tbl, acc_tbl, list(pngs), preflight, data.agent_table)
    md += _transcripts_markdown(data.transcripts, data.transcripts_file)
    page = _html(title, header, main, norm, stage_tbl, acc_tbl, pngs, preflight, data.agent_table,
                 _transcripts_html(data.transcripts, data.transcripts_file))
    atomic_write(
        out / SUMMARY_JSON, (json.dumps(data.summary, indent=2, allow_nan=False) + "\n").encode()
    )
    atomic_write(out / REPORT_MD, md.encode("utf-8"))
    atomic_write(out / REPORT_HTML, page.encode("utf-8"))
    return data.summary


# ------------------------------------------------------------------------------------------- rendering


PREFLIGHT_HOW = (
    "Checked before each MOPD stage trained: every teacher has the student's vocabulary and special tokens "
    "(refused otherwise, unless it opted into cross-tokenizer scoring: docs/CROSS_TOKENIZER.md), and the exact per-token reverse KL(student || teacher) on the student's own rollouts "
    "of the teacher's domains. A large initial KL flags a foreign or drifted teacher (the MOPD paper saw ~0.04 "
    "for a same-lineage teacher and ~0.19 for a foreign one whose distillation collapsed)."
)


def _header(run: dict[str, Any], recipe: str, wall: float, has_copy: bool) -> str:
    """The run in one line. The recipe is named as it was given: by its `name`, the relative path it was run
    from, and its copy in the run directory. An absolute path is left out: it names a file on the machine the
    run happened on, which a reader of a shared or moved report has not got (the copy beside the report has
    the same contents)."""
    named = f"recipe `{recipe}`"
    given = run.get("recipe_path")
    absolute = isinstance(given, str) and any(p(given).is_absolute() for p in (PurePosixPath, PureWindowsPath))
    if isinstance(given, str) and given and not absolute:
        named += f" from `{given}`"
    if has_copy:
        named += " (a copy is `recipe.yaml` beside this report)"
    bits = [named]
    if run.get("seed") is not None:
        bits.append(f"seed {run['seed']}")
    return ", ".join(bits) + f"; wall time {fmt_duration(wall)} ({wall:.1f} s)."


HOW_TO_READ = (
    "Each row is one domain: *start* is the checkpoint the MOPD student was initialised from, *teacher* is that "
    "domain's specialist, and each student column is a MOPD stage's final score on the same fixed held-out set "
    "(mean verifier reward); every student, later rounds included, is measured against this same start and teacher. "
    "Recovery = (student - start) / (teacher - start): 1.0 means the student gained as much "
    "as the teacher on that domain, 0 means no gain over start, below 0 means it got worse, above 1 means it beat "
    "the teacher. The normalized score is the mean recovery over the domains where recovery is defined: a domain "
    "whose teacher gained less than `report.min_teacher_gain` (default 0.05) over the start is marked *teacher "
    "gain too small* and left out, since a ratio over so small a gain is noise."
)


def _norm_line(norm: dict[str, float | None]) -> str:
    if not norm:
        return "No MOPD student in this run."
    parts = [f"`{s}` {fmt_number(v)}" for s, v in norm.items()]
    return "**Normalized score** (mean recovery over domains): " + "; ".join(parts) + "."


def _markdown(title, header, main, norm, stage_tbl, acc_tbl, figures, preflight: Table | None = None,
              agents: Table | None = None) -> str:
    out = [f"# {title}\n", header[0].upper() + header[1:] + "\n"]
    out += ["## Teacher gain recovered\n", main.markdown(), _norm_line(norm) + "\n"]
    out += ["### How to read this\n", HOW_TO_READ + "\n"]
    if preflight is not None:
        out += ["## Teacher preflight\n", PREFLIGHT_HOW + "\n", preflight.markdown()]
    if figures:
        out.append("## Training curves\n")
        out += [f"![{Path(f).stem}]({f})\n" for f in figures]
    out += ["## Stages\n", stage_tbl.markdown(), "## Accuracy (exact match)\n", acc_tbl.markdown()]
    if agents is not None:
        out += ["## Agent episodes (tool-use domains)\n", agents.markdown()]
    return "\n".join(out)


def _transcripts_intro(source: str) -> str:
    return (f"The student's highest- and lowest-reward held-out transcript of each domain, from its last eval "
            f"(`{source}`; every eval's are in its stage's `samples/`, and `mopd eval --show K` prints more).")


def _transcripts_markdown(shown: list[tuple[str, dict[str, Any]]], source: str | None) -> str:
    if not shown or source is None:
        return ""
    out = ["\n## Transcripts (best and worst per domain)\n", _transcripts_intro(source) + "\n"]
    for kind, record in shown:
        fence = "````" if "```" in render(record) else "```"  # a transcript holding a fence keeps its own
        out.append(f"**{kind}**, `{record.get('domain', '')}`:\n\n{fence}text\n{render(record)}\n{fence}\n")
    return "\n".join(out)


def _transcripts_html(shown: list[tuple[str, dict[str, Any]]], source: str | None) -> str:
    if not shown or source is None:
        return ""
    e = html.escape
    parts = ["<h2>Transcripts (best and worst per domain)</h2>", f"<p>{e(_transcripts_intro(source).replace('`', ''))}</p>"]
    parts += [f"<p><b>{e(kind)}</b>, {e(str(record.get('domain', '')))}:</p><pre>{e(render(record))}</pre>"
              for kind, record in shown]
    return "".join(parts)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
)


def _html(
    title, header, main, norm, stage_tbl, acc_tbl, pngs: dict[str, bytes], preflight: Table | None = None,
    agents: Table | None = None, transcripts: str = "",
) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
        f"<p>{e(header.replace('`', ''))}</p><h2>Teacher gain recovered</h2>",
        main.html(),
        f"<p>{e(_norm_line(norm).replace('`', '').replace('**', ''))}</p>",
        f"<h3>How to read this</h3><p>{e(HOW_TO_READ.replace('*', ''))}</p>",
    ]
    if preflight is not None:
        parts += ["<h2>Teacher preflight</h2>", f"<p>{e(PREFLIGHT_HOW)}</p>", preflight.html()]
    if pngs:
        parts.append("<h2>Training curves</h2>")
        for name, data in pngs.items():
            b64 = base64.b64encode(data).decode("ascii")
            parts.append(f"<p><img alt='{e(name)}' src='data:image/png;base64,{b64}'></p>")
    parts += ["<h2>Stages</h2>", stage_tbl.html(), "<h2>Accuracy (exact match)</h2>", acc_tbl.html()]
    if agents is not None:
        parts += ["<h2>Agent episodes (tool-use domains)</h2>", agents.html()]
    parts += [transcripts, "</body></html>\n"]
    return "".join(parts)
