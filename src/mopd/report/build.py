"""Rebuild a run's report from the files in its run directory alone (no model loading).

Reads RUN/run.json, RUN/<stage>/metrics.jsonl and RUN/<stage>/final/mopd.json; writes, each atomically
(temp file in RUN/, then os.replace): report.md, report.html, summary.json and the curve PNGs
(reward.png, reverse_kl.png, entropy.png, completion_len.png, routing_share.png, is_dropped.png,
teacher_nll.png; a figure with no data is not written). Each MOPD stage's RUN/<stage>/preflight.json (the
teacher-student compatibility check) becomes a "Teacher preflight" table.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.report.plots import FIGURE_NAMES, render_figures
from mopd.report.scores import MIN_TEACHER_GAIN, normalized_score, recovery

REQUIRED_RUN_KEYS = ("recipe", "stages", "report")
REQUIRED_REPORT_KEYS = ("start", "student", "teachers")
MISSING = "—"


# ----------------------------------------------------------------------------------------------- reading


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read and check RUN/run.json; raises a one-line ValueError naming the file."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found (is this a run directory?)")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object at top level")
    missing = [k for k in REQUIRED_RUN_KEYS if k not in run]
    rep = run.get("report")
    if isinstance(rep, dict):
        missing += [f"report.{k}" for k in REQUIRED_REPORT_KEYS if k not in rep]
    elif "report" in run:
        raise ValueError(f"{path}: 'report' must be an object with keys {', '.join(REQUIRED_REPORT_KEYS)}")
    if missing:
        raise ValueError(f"{path}: missing required key(s): {', '.join(missing)}")
    stages = run["stages"]
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise ValueError(f"{path}: 'stages' must map stage names to objects")
    if not isinstance(rep["teachers"] or {}, dict):
        raise ValueError(f"{path}: 'report.teachers' must map domains to teacher stages")
    return run


def _as_step(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return None


def _num(x: Any) -> float | None:
    """x as a finite float, or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Parsed lines of a metrics.jsonl; malformed lines (bad JSON, not an object, no integer "step")
    are skipped with one RuntimeWarning per file."""
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            step = _as_step(obj.get("step")) if isinstance(obj, dict) else None
            if step is None:
                bad.append(lineno)
                continue
            obj["step"] = step
            rows.append(obj)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} malformed line(s) (first at line {bad[0]})",
            RuntimeWarning,
            stacklevel=2,
        )
    return rows


def curves_from_rows(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metric key -> [(step, value)] sorted by step; numeric finite values only, eval/* keys left out.
    When a step is logged twice (a resumed stage), the later line wins."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in row.items():
            val = _num(v)
            if k == "step" or k.startswith("eval/") or val is None:
                continue
            by_key.setdefault(k, {})[row["step"]] = val
    return {k: sorted(d.items()) for k, d in by_key.items()}


def read_final_eval(stage_dir: Path) -> dict[str, dict[str, float | None]] | None:
    """{domain: {"score", "accuracy"}} from <stage>/final/mopd.json; None when the file is absent
    (stage not finished) or unreadable (with a warning)."""
    path = Path(stage_dir) / "final" / "mopd.json"
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: unreadable, stage treated as unfinished ({e})", RuntimeWarning, stacklevel=2)
        return None
    metrics = obj.get("metrics") if isinstance(obj, dict) else None
    ev = metrics.get("eval") if isinstance(metrics, dict) else None
    out: dict[str, dict[str, float | None]] = {}
    if isinstance(ev, dict):
        for domain, d in ev.items():
            if isinstance(d, dict):
                out[str(domain)] = {"score": _num(d.get("score")), "accuracy": _num(d.get("accuracy"))}
    return out


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


def _fmt(x: float | None, nd: int = 3) -> str:
    return MISSING if x is None else f"{x:.{nd}f}"


def _fmt_duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


# ----------------------------------------------------------------------------------------------- build


def _atomic_write(path: Path, data: bytes) -> None:
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


def _stage_order(run: dict[str, Any]) -> list[str]:
    stages = run["stages"]
    order = [s for s in (run.get("order") or []) if s in stages]
    return order + [s for s in stages if s not in order]


def build_report(run_dir: Path) -> dict[str, Any]:
    """Rebuild report.md, report.html, summary.json and the curve PNGs in `run_dir`; returns the summary.

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

    wall = _num(run.get("wall_seconds"))
    if wall is None:
        wall = sum(_num(st.get("wall_seconds")) or 0.0 for st in stages.values())

    finals = {s: read_final_eval(run_dir / s) for s in order}

    def score(stage: str | None, domain: str, key: str = "score") -> float | None:
        ev = finals.get(stage) if stage is not None else None
        return (ev or {}).get(domain, {}).get(key)

    students = [s for s in order if stages[s].get("kind") == "mopd"]
    if student is not None and student not in students:
        students.insert(0, student)

    # recovery per (student, domain), shared start and per-domain teacher from the report block
    rec = {
        s: {d: recovery(score(start, d), score(teachers[d], d), score(s, d)) for d in domains}
        for s in students
    }
    norm = {s: normalized_score(rec[s].values()) for s in students}

    summary = {
        "recipe": recipe,
        "wall_seconds": float(wall),
        "normalized_score": norm.get(student),
        "domains": {
            d: {
                "start": score(start, d),
                "teacher": score(teachers[d], d),
                "student": score(student, d),
                "recovery": rec[student][d] if student in rec else None,
            }
            for d in domains
        },
    }

    main = _recovery_table(start, teachers, students, rec, norm, score)
    stage_tbl, acc_tbl = _stage_tables(order, stages, finals, domains)
    preflight = _preflight_table(run_dir, [s for s in order if stages[s].get("kind") == "mopd"])

    curves = {}
    for s in order:
        path = run_dir / s / "metrics.jsonl"
        if path.is_file():
            curves[s] = curves_from_rows(read_metrics(path))
    pngs = render_figures(curves, order, recipe)
    for name in FIGURE_NAMES:
        target = run_dir / name
        if name in pngs:
            _atomic_write(target, pngs[name])
        else:  # remove a stale figure from an earlier build so the report never links old data
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    header = _header(run, recipe, wall)
    title = f"MOPD report: {recipe} ({_fmt_duration(wall)} wall)"
    md = _markdown(title, header, main, norm, stage_tbl, acc_tbl, list(pngs), preflight)
    page = _html(title, header, main, norm, stage_tbl, acc_tbl, pngs, preflight)
    _atomic_write(run_dir / "summary.json", (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
    _atomic_write(run_dir / "report.md", md.encode("utf-8"))
    _atomic_write(run_dir / "report.html", page.encode("utf-8"))
    return summary


def _recovery_table(start, teachers, students, rec, norm, score) -> Table:
    many = len(students) > 1
    headers = ["domain", f"start ({start})"]
    headers.append("teacher")
    for s in students:
        headers += [s, f"recovery ({s})" if many else "recovery"]
    rows, notes = [], []
    for d, t in teachers.items():
        st, te = score(start, d), score(t, d)
        row = [d, _fmt(st), f"{_fmt(te)} ({t})"]
        for s in students:
            r = rec[s][d]
            row += [_fmt(score(s, d)), "n/a" if r is None else f"{r:.3f}"]
        rows.append(row)
        if st is None or te is None:
            notes.append(
                f"n/a on `{d}`: no final eval score for "
                + " and ".join(f"`{x}`" for x, v in ((start, st), (t, te)) if v is None)
                + "; excluded from the normalized score."
            )
        elif te - st <= MIN_TEACHER_GAIN:
            notes.append(
                f"n/a on `{d}`: the teacher `{t}` did not improve on start (teacher - start = {te - st:+.3g} "
                f"<= {MIN_TEACHER_GAIN:g}), so there is no gain to recover; excluded from the normalized score."
            )
        else:
            for s in students:
                if rec[s][d] is None:
                    notes.append(f"n/a on `{d}` for `{s}`: no final eval score (stage not finished?).")
    last = ["**normalized score**", "", ""]
    for s in students:
        last += ["", f"**{_fmt(norm[s])}**"]
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
        w = _num(st.get("wall_seconds"))
        rows.append(
            [
                s,
                str(st.get("kind") or MISSING),
                str(st.get("init") or MISSING),
                tcell or MISSING,
                "finished" if ev is not None else "no final/mopd.json",
                _fmt(w, 1),
            ]
            + [_fmt((ev or {}).get(d, {}).get("score")) for d in all_domains]
        )
    acc_rows = [
        [s] + [_fmt(finals[s].get(d, {}).get("accuracy")) for d in all_domains] for s in order if finals[s]
    ]
    acc = Table(["stage"] + [f"accuracy: {d}" for d in all_domains], acc_rows)
    if not acc_rows:
        acc.notes.append("No stage has a final eval yet.")
    return Table(headers, rows), acc


def _preflight_table(run_dir: Path, mopd_stages: list[str]) -> Table | None:
    """One row per (MOPD stage, teacher) from <stage>/preflight.json; None when no stage has one."""
    rows, notes = [], []
    for s in mopd_stages:
        path = run_dir / s / "preflight.json"
        if not path.is_file():
            continue
        try:
            pf = json.loads(path.read_text(encoding="utf-8"))
            teachers = pf["teachers"]
            kl_warn = _num(pf.get("kl_warn"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            warnings.warn(f"{path}: unreadable preflight result, left out ({e})", RuntimeWarning, stacklevel=2)
            continue
        for t, r in teachers.items():
            kl = _num(r.get("reverse_kl"))
            status = "**WARNING**: far from the student" if r.get("warn") else "ok"
            rows.append([s, t, ", ".join(r.get("domains") or []), _fmt(kl, 4), _fmt(kl_warn, 3), status])
        notes += [str(w) for w in pf.get("warnings") or []]
    if not rows:
        return None
    headers = ["stage", "teacher", "domains", "initial reverse KL", "kl_warn", "status"]
    return Table(headers, rows, notes)


PREFLIGHT_HOW = (
    "Checked before each MOPD stage trained: every teacher has the student's vocabulary and special tokens "
    "(refused otherwise), and the exact per-token reverse KL(student || teacher) on the student's own rollouts "
    "of the teacher's domains. A large initial KL flags a foreign or drifted teacher (the MOPD paper saw ~0.04 "
    "for a same-lineage teacher and ~0.19 for a foreign one whose distillation collapsed)."
)


def _header(run, recipe, wall) -> str:
    bits = [f"recipe `{recipe}`"]
    if run.get("recipe_path"):
        bits.append(f"from `{run['recipe_path']}`")
    if run.get("seed") is not None:
        bits.append(f"seed {run['seed']}")
    return ", ".join(bits) + f"; wall time {_fmt_duration(wall)} ({wall:.1f} s)."


HOW_TO_READ = (
    "Each row is one domain: *start* is the checkpoint the MOPD student was initialised from, *teacher* is that "
    "domain's specialist, and each student column is a MOPD stage's final score on the same fixed held-out set "
    "(mean verifier reward); every student, later rounds included, is measured against this same start and teacher. "
    "Recovery = (student - start) / (teacher - start): 1.0 means the student gained as much "
    "as the teacher on that domain, 0 means no gain over start, below 0 means it got worse, above 1 means it beat "
    "the teacher. The normalized score is the mean recovery over the domains where recovery is defined."
)


def _norm_line(norm: dict[str, float | None]) -> str:
    if not norm:
        return "No MOPD student in this run."
    parts = [f"`{s}` {_fmt(v)}" for s, v in norm.items()]
    return "**Normalized score** (mean recovery over domains): " + "; ".join(parts) + "."


def _markdown(title, header, main, norm, stage_tbl, acc_tbl, figures, preflight: Table | None = None) -> str:
    out = [f"# {title}\n", header[0].upper() + header[1:] + "\n"]
    out += ["## Teacher gain recovered\n", main.markdown(), _norm_line(norm) + "\n"]
    out += ["### How to read this\n", HOW_TO_READ + "\n"]
    if preflight is not None:
        out += ["## Teacher preflight\n", PREFLIGHT_HOW + "\n", preflight.markdown()]
    if figures:
        out.append("## Training curves\n")
        out += [f"![{Path(f).stem}]({f})\n" for f in figures]
    out += ["## Stages\n", stage_tbl.markdown(), "## Accuracy (exact match)\n", acc_tbl.markdown()]
    return "\n".join(out)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
)


def _html(title, header, main, norm, stage_tbl, acc_tbl, pngs: dict[str, bytes],
          preflight: Table | None = None) -> str:
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
    parts.append("</body></html>\n")
    return "".join(parts)
