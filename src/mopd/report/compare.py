"""The comparison table of `mopd compare`, in the MOPD paper's terms, from a run directory's files alone.

For each method: per-domain held-out score, per-domain recovery (score - start) / (teacher - start), the
normalized score (mean recovery), student samples and wall time. Writes compare.md, compare.json,
compare_bars.png and sample_efficiency.png (normalized score against cumulative student samples, from the
stages' `eval_every` records). What each method is charged for comes from the plan (recipe/compare.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mopd.report.build import atomic_write
from mopd.report.compare_plots import render_bars, render_sample_efficiency
from mopd.report.scores import normalized_score, recovery
from mopd.report.tables import (
    MISSING,
    Table,
    fmt_duration,
    fmt_number,
    load_run,
    read_final_eval,
    read_metrics,
)

FILES = ("compare.md", "compare.json", "compare_bars.png", "sample_efficiency.png")


def _stage_totals(run_dir: Path, stage: str) -> dict[str, float]:
    """A stage's cumulative student / teacher samples: the last metrics record that carries them."""
    path = run_dir / stage / "metrics.jsonl"
    out = {"samples": 0.0, "teacher_samples": 0.0}
    if path.is_file():
        for row in read_metrics(path):
            for k in out:
                if isinstance(row.get(k), (int, float)):
                    out[k] = float(row[k])
    return out


def _norm(scores: dict[str, float | None], start: dict, teacher: dict) -> tuple[dict, float | None]:
    rec = {d: recovery(start.get(d), teacher.get(d), scores.get(d)) for d in teacher}
    return rec, normalized_score(rec.values())


def _curve(run_dir: Path, plan_m: dict, start: dict, teacher: dict, score_of, totals) -> list[tuple[float, float]]:
    """(cumulative student samples, normalized score) at the method's start and at each of its eval records."""
    chain = plan_m["chain"]
    if not chain:
        return []
    stage = chain[0]
    offset = sum(totals[s]["samples"] for s in chain[1:])
    init = chain[1] if len(chain) > 1 else None
    points: list[tuple[float, float]] = []
    first = _norm(score_of(init), start, teacher)[1] if init else _norm(start, start, teacher)[1]
    if first is not None:
        points.append((offset, first))
    path = run_dir / stage / "metrics.jsonl"
    if path.is_file():
        for row in read_metrics(path):
            ev = {d: row.get(f"eval/{d}") for d in teacher}
            if all(isinstance(v, (int, float)) for v in ev.values()) and isinstance(row.get("samples"), (int, float)):
                n = _norm(ev, start, teacher)[1]
                if n is not None:
                    points.append((offset + float(row["samples"]), n))
    return sorted(set(points))


def build_compare(run_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Write the comparison files into `run_dir`; returns what compare.json holds."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    info = run["stages"]
    finals: dict[str, dict] = {}

    def score_of(stage: str | None) -> dict[str, float | None]:
        if stage is None:
            return {}
        if stage not in finals:
            finals[stage] = read_final_eval(run_dir / stage) or {}
        return {d: v.get("score") for d, v in finals[stage].items()}

    teachers: dict[str, str] = plan["teachers"]
    start = score_of(plan["start"])
    teacher = {d: score_of(t).get(d) for d, t in teachers.items()}
    all_stages = {s for m in plan["methods"].values() for s in m["chain"] + m["extra"]}
    totals = {s: _stage_totals(run_dir, s) for s in all_stages}
    wall = {s: float(info.get(s, {}).get("wall_seconds") or 0.0) for s in all_stages}

    methods: dict[str, dict] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for label, m in plan["methods"].items():
        scores = score_of(m["stage"])
        rec, norm = _norm(scores, start, teacher)
        charged = m["chain"] + m["extra"]
        methods[label] = {
            "stage": m["stage"],
            "kind": m["kind"],
            "normalized_score": norm,
            "domains": {d: {"score": scores.get(d), "recovery": rec[d]} for d in teachers},
            "samples": int(sum(totals[s]["samples"] for s in m["chain"])),
            "other_samples": int(sum(totals[s]["teacher_samples"] for s in m["chain"])
                                 + sum(totals[s]["samples"] + totals[s]["teacher_samples"] for s in m["extra"])),
            "wall_seconds": round(sum(wall[s] for s in charged), 2),
            "stages": charged,
        }
        if label in plan["curves"]:
            curves[label] = _curve(run_dir, m, start, teacher, score_of, totals)

    result = {
        "recipe": run["recipe"],
        "start": {"stage": plan["start"], "domains": start},
        "teachers": {d: {"stage": t, "score": teacher[d]} for d, t in teachers.items()},
        "methods": methods,
        "sample_efficiency": {k: [list(p) for p in v] for k, v in curves.items()},
    }
    title = f"{run['recipe']}: normalized score by method"
    atomic_write(run_dir / "compare_bars.png", render_bars(methods, list(teachers), title))
    atomic_write(run_dir / "sample_efficiency.png",
                 render_sample_efficiency(curves, f"{run['recipe']}: sample efficiency"))
    atomic_write(run_dir / "compare.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(run_dir / "compare.md", _markdown(result, plan).encode("utf-8"))
    return result


def compare_table(result: dict[str, Any]) -> Table:
    domains = list(result["teachers"])
    headers = ["method", "stage", *domains, *(f"recovery: {d}" for d in domains), "normalized score",
               "student samples", "other samples", "wall"]
    start, teach = result["start"], result["teachers"]
    rows = [
        ["start", start["stage"], *(fmt_number(start["domains"].get(d)) for d in domains),
         *([MISSING] * len(domains)), "0 (by definition)", "", "", ""],
        ["teacher", ", ".join(t["stage"] for t in teach.values()),
         *(fmt_number(teach[d]["score"]) for d in domains),
         *([MISSING] * len(domains)), "1 (by definition)", "", "", ""],
    ]
    for label, m in result["methods"].items():
        rows.append([
            f"**{label}**", m["stage"],
            *(fmt_number(m["domains"][d]["score"]) for d in domains),
            *(fmt_number(m["domains"][d]["recovery"]) for d in domains),
            f"**{fmt_number(m['normalized_score'])}**", f"{m['samples']:,}", f"{m['other_samples']:,}",
            fmt_duration(m["wall_seconds"]),
        ])
    notes = [
        "Scores: mean verifier reward on each domain's fixed held-out set (greedy). Recovery = (method - start) / "
        "(teacher - start); normalized score = mean recovery over domains (MOPD paper, arXiv 2606.30406).",
        "Student samples: rollouts sampled by the model being trained, summed over the method's stages after the "
        "start. Other samples: teacher traces (off-policy FT) and the samples of non-shared stages such as "
        "round-2 teachers. The shared start and round-1 teachers are not charged to any method.",
        "Wall: the method's own stages (a stage reused from an earlier run keeps its recorded time).",
    ]
    for label, m in result["methods"].items():
        if len(m["stages"]) > 1:
            notes.append(f"`{label}` is charged for stages {', '.join(m['stages'])}.")
    return Table(headers, rows, notes)


def _markdown(result: dict[str, Any], plan: dict[str, Any]) -> str:
    out = [f"# Method comparison: {result['recipe']}\n", compare_table(result).markdown()]
    out.append("![normalized score by method](compare_bars.png)\n")
    if result["sample_efficiency"]:
        out.append("## Sample efficiency\n")
        out.append("Normalized score against cumulative student samples for "
                   + ", ".join(f"`{k}`" for k in result["sample_efficiency"]) + ".\n")
        out.append("![sample efficiency](sample_efficiency.png)\n")
    return "\n".join(out)
