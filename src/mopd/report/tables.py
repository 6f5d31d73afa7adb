"""Compute what a run's report shows from what `run_files` reads: recovery, normalized scores, the summary and
the tables, as data.

Kept apart from rendering (:mod:`mopd.report.build`) so the numbers can be checked, and reused by
`mopd compare` and the benchmarks, without writing any report file; nothing here writes to the run directory.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.report.run_files import (
    curves_from_rows,
    final_problem,
    finite_number,
    load_run,
    read_final_eval,
    read_metrics,
)
from mopd.report.scores import (
    MIN_TEACHER_GAIN,
    TOO_SMALL,
    gain_too_small,
    gain_warnings,
    normalized_score,
    recovery,
)

from ..core.run_dir import METRICS, PREFLIGHT, SAMPLES
from ..eval.transcripts import best_and_worst, read_transcripts

MISSING = "—"


def incomplete_message(summary: dict[str, Any]) -> str | None:
    """What a report of an incomplete run says first: the stages without a verified final checkpoint, and the
    file that failed for each one that is on disk but corrupt. None for a complete run."""
    missing = summary.get("missing_stages")
    if not missing:
        return None
    corrupt = summary.get("corrupt", {})
    parts = [f"{s} ({corrupt[s]})" if s in corrupt else s for s in missing]
    return f"no verified finished checkpoint for {'; '.join(parts)}"


# ----------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        def cell(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(cell(h) for h in self.headers) + " |"]
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        out = "\n".join(lines) + "\n"
        if self.notes:
            out += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return out

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in row) + "</tr>"
            for row in self.rows
        )
        out = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if self.notes:
            out += (
                "<ul>" + "".join(f"<li>{html.escape(n.replace('`', ''))}</li>" for n in self.notes) + "</ul>"
            )
        return out


def fmt_number(x: float | None, nd: int = 3) -> str:
    return MISSING if x is None else f"{x:.{nd}f}"


def fmt_duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


# ------------------------------------------------------------------------------------------------ report


def _stage_order(run: dict[str, Any]) -> list[str]:
    stages = run["stages"]
    order = [s for s in (run.get("order") or []) if s in stages]
    return order + [s for s in stages if s not in order]


@dataclass
class ReportData:
    """Everything report.md, report.html and summary.json show, computed before any of it is rendered."""

    run: dict[str, Any]
    recipe: str
    wall: float
    order: list[str]
    summary: dict[str, Any]
    norm: dict[str, float | None]
    recovery_table: Table
    stage_table: Table
    accuracy_table: Table
    preflight_table: Table | None
    curves: dict[str, dict[str, list[tuple[int, float]]]]
    agent_table: Table | None = None  # tool-use domains' episodes: tool-call rate and episode length per stage
    transcripts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # the student's best and worst
    transcripts_file: str | None = None  # where they came from, relative to the run directory


def compute_report(run_dir: Path) -> ReportData:
    """Read `run_dir` and compute the report's numbers and tables.

    Raises ValueError (one line, naming the file) when run.json is missing or lacks required keys.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    stages: dict[str, dict[str, Any]] = run["stages"]
    rep = run["report"]
    order = _stage_order(run)
    recipe = str(run["recipe"])
    start, student = rep["start"], rep["student"]
    teachers: dict[str, str] = {str(d): t for d, t in (rep["teachers"] or {}).items()}
    domains = list(teachers)
    min_gain = finite_number(rep.get("min_teacher_gain"))  # a run.json from before the setting: the default
    min_gain = MIN_TEACHER_GAIN if min_gain is None else min_gain

    wall = finite_number(run.get("wall_seconds"))
    if wall is None:
        wall = sum(finite_number(st.get("wall_seconds")) or 0.0 for st in stages.values())

    finals = {s: read_final_eval(run_dir / s) for s in order}

    def score(stage: str | None, domain: str, key: str = "score") -> float | None:
        ev = finals.get(stage) if stage is not None else None
        return (ev or {}).get(domain, {}).get(key)

    students = [s for s in order if stages[s].get("kind") == "mopd"]
    if student is not None and student not in students:
        students.insert(0, student)

    # recovery per (student, domain), shared start and per-domain teacher from the report block
    rec = {
        s: {d: recovery(score(start, d), score(teachers[d], d), score(s, d), min_gain) for d in domains}
        for s in students
    }
    norm = {s: normalized_score(rec[s].values()) for s in students}
    warned = gain_warnings({d: score(start, d) for d in domains}, {d: score(teachers[d], d) for d in domains},
                           teachers, min_gain)

    summary = {
        "recipe": recipe,
        "wall_seconds": float(wall),
        "normalized_score": norm.get(student),
        "min_teacher_gain": min_gain,
        "domains": {
            d: {
                "start": score(start, d),
                "teacher": score(teachers[d], d),
                "student": score(student, d),
                "recovery": rec[student][d] if student in rec else None,
                **({"status": TOO_SMALL} if gain_too_small(score(start, d), score(teachers[d], d), min_gain) else {}),
            }
            for d in domains
        },
        "warnings": warned,
    }

    # stages of the run with no readable final checkpoint on disk: the report says so (and `mopd report` exits
    # non-zero) instead of showing their scores as if the run were complete
    # (a teacher named by its directory, not a stage of the run, has no score here: its domain's recovery is
    # undefined, not a missing stage)
    named = dict.fromkeys([*order, *(s for s in (start, *teachers.values(), student) if s is not None and
                                     (s in order or s not in teachers.values()))])
    missing = [s for s in named if (finals[s] if s in finals else read_final_eval(run_dir / s)) is None]
    if missing:
        summary["missing_stages"] = missing
        corrupt = {s: p for s in missing if (p := final_problem(run_dir / s))}
        if corrupt:
            summary["corrupt"] = corrupt

    main = _recovery_table(start, teachers, students, rec, norm, score, min_gain)
    stage_tbl, acc_tbl = _stage_tables(order, stages, finals, domains)
    preflight = _preflight_table(run_dir, [s for s in order if stages[s].get("kind") == "mopd"])
    agents = _agent_table(order, finals)

    shown, shown_file = _student_transcripts(run_dir, student)

    curves = {}
    for s in order:
        path = run_dir / s / METRICS
        if path.is_file():
            curves[s] = curves_from_rows(read_metrics(path))

    return ReportData(
        run=run,
        recipe=recipe,
        wall=wall,
        order=order,
        summary=summary,
        norm=norm,
        recovery_table=main,
        stage_table=stage_tbl,
        accuracy_table=acc_tbl,
        preflight_table=preflight,
        curves=curves,
        agent_table=agents,
        transcripts=shown,
        transcripts_file=shown_file,
    )


def _student_transcripts(run_dir: Path, student: str | None) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
    """The best and worst held-out transcript of each domain from the student's last eval (its highest-step
    `samples/eval-<step>.jsonl`), and that file; nothing when it has none (a run from before transcripts)."""
    if student is None:
        return [], None
    files = sorted((run_dir / student / SAMPLES).glob("eval-*.jsonl"))
    if not files:
        return [], None
    return best_and_worst(read_transcripts(files[-1])), str(files[-1].relative_to(run_dir))


def _recovery_table(start, teachers, students, rec, norm, score, min_gain: float) -> Table:
    many = len(students) > 1
    headers = ["domain", f"start ({start})"]
    headers.append("teacher")
    for s in students:
        headers += [s, f"recovery ({s})" if many else "recovery"]
    rows, notes = [], []
    for d, t in teachers.items():
        st, te = score(start, d), score(t, d)
        row = [d, fmt_number(st), f"{fmt_number(te)} ({t})"]
        small = gain_too_small(st, te, min_gain)
        for s in students:
            r = rec[s][d]
            row += [fmt_number(score(s, d)), TOO_SMALL if small else "n/a" if r is None else f"{r:.3f}"]
        rows.append(row)
        if st is None or te is None:
            notes.append(
                f"n/a on `{d}`: no final eval score for "
                + " and ".join(f"`{x}`" for x, v in ((start, st), (t, te)) if v is None)
                + "; excluded from the normalized score."
            )
        elif small:
            notes.append(
                f"**Warning**: {TOO_SMALL} on `{d}`: the teacher `{t}` gained {te - st:+.3f} over the start, under "
                f"the minimum {min_gain:g} (`report.min_teacher_gain`); a recovery of so small a gain is noise, so "
                "it is left out of the normalized score."
            )
        else:
            for s in students:
                if rec[s][d] is None:
                    notes.append(f"n/a on `{d}` for `{s}`: no final eval score (stage not finished?).")
    ses = []
    for d, t in teachers.items():
        cells = [(x, score(x, d, "se")) for x in dict.fromkeys((start, t, *students)) if x is not None]
        if any(se is not None for _, se in cells):
            ses.append(f"{d}: " + ", ".join(f"{x} ±{fmt_number(se)}" for x, se in cells if se is not None))
    if ses:
        notes.append("Held-out standard errors (per-prompt rewards' sd / sqrt(n)): " + "; ".join(ses) + ".")
    last = ["**normalized score**", "", ""]
    for s in students:
        last += ["", f"**{fmt_number(norm[s])}**"]
    if students:
        rows.append(last)
    return Table(headers, rows, notes)


def _stage_tables(order, stages, finals, domains) -> tuple[Table, Table]:
    all_domains = list(domains) + sorted({d for ev in finals.values() if ev for d in ev} - set(domains))
    headers = ["stage", "kind", "init", "teachers", "status", "wall (s)"] + [
        f"eval: {d}" for d in all_domains
    ]
    rows = []
    for s in order:
        st = stages[s]
        tmap = st.get("teachers") or {}
        tcell = ", ".join(f"{d}: {t}" for d, t in tmap.items()) if isinstance(tmap, dict) else str(tmap)
        ev = finals[s]
        w = finite_number(st.get("wall_seconds"))
        rows.append(
            [
                s,
                str(st.get("kind") or MISSING),
                str(st.get("init") or MISSING),
                tcell or MISSING,
                "finished" if ev is not None else "no verified final/",
                fmt_number(w, 1),
            ]
            + [fmt_number((ev or {}).get(d, {}).get("score")) for d in all_domains]
        )
    acc_rows = [
        [s] + [fmt_number(finals[s].get(d, {}).get("accuracy")) for d in all_domains]
        for s in order
        if finals[s]
    ]
    acc = Table(["stage"] + [f"accuracy: {d}" for d in all_domains], acc_rows)
    if not acc_rows:
        acc.notes.append("No stage has a final eval yet.")
    return Table(headers, rows), acc


def _agent_table(order, finals) -> Table | None:
    """Per stage, on each tool-use domain: the share of held-out episodes that called a tool and the mean episode
    length (completion-window tokens, model and observation). None when no domain was played as episodes."""
    agentic = sorted({d for ev in finals.values() if ev for d, r in ev.items() if "tool_call_rate" in r})
    if not agentic:
        return None
    rows = []
    for s in order:
        ev = finals[s] or {}
        if not any(d in ev for d in agentic):
            continue
        rows.append([s] + [
            f"{ev[d]['tool_call_rate']:.0%} / {ev[d]['episode_length']:.1f}" if "tool_call_rate" in ev.get(d, {})
            else MISSING for d in agentic
        ])
    return Table(["stage"] + [f"{d}: tool calls / length" for d in agentic], rows,
                 ["Held-out episodes, greedy: the share that called a tool at least once, and the mean episode "
                  "length in tokens (the model's and the observations')."])


def _preflight_table(run_dir: Path, mopd_stages: list[str]) -> Table | None:
    """One row per (MOPD stage, teacher) from <stage>/preflight.json; None when no stage has one."""
    rows, notes = [], []
    for s in mopd_stages:
        path = run_dir / s / PREFLIGHT
        if not path.is_file():
            continue
        try:
            pf = json.loads(path.read_text(encoding="utf-8"))
            teachers = pf["teachers"]
            kl_warn = finite_number(pf.get("kl_warn"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            warnings.warn(
                f"{path}: unreadable preflight result, left out ({e})", RuntimeWarning, stacklevel=2
            )
            continue
        for t, r in teachers.items():
            kl = finite_number(r.get("reverse_kl"))
            status = "**WARNING**: far from the student" if r.get("warn") else "ok"
            rows.append(
                [s, t, ", ".join(r.get("domains") or []), fmt_number(kl, 4), fmt_number(kl_warn, 3), status,
                 _alignment_cell(r.get("cross_tokenizer"))]
            )
        notes += [str(w) for w in pf.get("warnings") or []]
    if not rows:
        return None
    headers = ["stage", "teacher", "domains", "initial reverse KL", "kl_warn", "status", "tokenizer"]
    if all(row[-1] == "the student's" for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    return Table(headers, rows, notes)


def _alignment_cell(cross: object) -> str:
    """A teacher's tokenizer column: the student's, or another one with how much of the text its chunks covered
    and the mean student tokens per chunk (preflight.json's `cross_tokenizer`, `teachers.cross_tokenizer`)."""
    if not isinstance(cross, dict):
        return "the student's"
    lengths = cross.get("student_tokens_per_chunk")
    mean = None
    if isinstance(lengths, dict) and lengths:
        try:
            mean = sum(int(k) * int(v) for k, v in lengths.items()) / sum(int(v) for v in lengths.values())
        except (TypeError, ValueError, ZeroDivisionError):
            mean = None
    frac = finite_number(cross.get("aligned_text_frac"))
    return (f"another (cross-tokenizer): {fmt_number(frac, 3)} of the text aligned, "
            f"{fmt_number(mean, 2)} student tokens a chunk")
