"""The comparison table of `mopd compare`, in the MOPD paper's terms, from a run directory's files alone.

For each method: per-domain held-out score, per-domain recovery (score - start) / (teacher - start), the
normalized score (mean recovery), student samples and wall time. Writes compare.md, compare.json,
compare_bars.png and sample_efficiency.png (normalized score against cumulative student samples, from the
stages' `eval_every` records). What each method is charged for comes from the plan (experiments/compare_plan.py).

Over several seeds (one run directory each) every number is the mean over seeds; every cell also gets a 95%
interval and its evaluation standard error, and each method its paired difference from the reference method
(MOPD), from the per-prompt rewards of the stages' final evaluations (`compare_intervals`, `compare_seeds`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mopd.report.build import atomic_write
from mopd.report.compare_intervals import compare_intervals
from mopd.report.compare_plots import render_bars, render_sample_efficiency
from mopd.report.compare_seeds import add_intervals, mean_over_seeds
from mopd.report.run_files import load_run, read_final_eval, read_metrics
from mopd.report.scores import (
    MIN_TEACHER_GAIN,
    TOO_SMALL,
    gain_too_small,
    gain_warnings,
    normalized_score,
    recovery,
)
from mopd.report.tables import MISSING, Table, fmt_duration, fmt_number

from ..core.run_dir import COMPARE_FILES, METRICS

FILES = COMPARE_FILES


def _stage_totals(run_dir: Path, stage: str) -> dict[str, float]:
    """A stage's cumulative student / teacher samples: the last metrics record that carries them."""
    path = run_dir / stage / METRICS
    out = {"samples": 0.0, "teacher_samples": 0.0}
    if path.is_file():
        for row in read_metrics(path):
            for k in out:
                if isinstance(row.get(k), (int, float)):
                    out[k] = float(row[k])
    return out


def min_gain_of(plan: dict[str, Any]) -> float:
    """The plan's `report.min_teacher_gain` (a plan written before the setting: the default)."""
    return float(plan.get("min_teacher_gain", MIN_TEACHER_GAIN))


def _norm(scores: dict[str, float | None], start: dict, teacher: dict, min_gain: float,
          ) -> tuple[dict, float | None]:
    rec = {d: recovery(start.get(d), teacher.get(d), scores.get(d), min_gain) for d in teacher}
    return rec, normalized_score(rec.values())


def _curve(run_dir: Path, plan_m: dict, start: dict, teacher: dict, score_of, totals, min_gain: float,
           ) -> list[tuple[float, float]]:
    """(cumulative student samples, normalized score) at the method's start and at each of its eval records."""
    chain = plan_m["chain"]
    if not chain:
        return []
    stage = chain[0]
    offset = sum(totals[s]["samples"] for s in chain[1:])
    init = chain[1] if len(chain) > 1 else None
    points: list[tuple[float, float]] = []
    first = _norm(score_of(init) if init else start, start, teacher, min_gain)[1]
    if first is not None:
        points.append((offset, first))
    path = run_dir / stage / METRICS
    if path.is_file():
        for row in read_metrics(path):
            ev = {d: row.get(f"eval/{d}") for d in teacher}
            if all(isinstance(v, (int, float)) for v in ev.values()) and isinstance(row.get("samples"), (int, float)):
                n = _norm(ev, start, teacher, min_gain)[1]
                if n is not None:
                    points.append((offset + float(row["samples"]), n))
    return sorted(set(points))


def _seed_result(run_dir: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """One run directory's comparison (one seed): what compare.json held before seeds, without intervals."""
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
    min_gain = min_gain_of(plan)
    for label, m in plan["methods"].items():
        scores = score_of(m["stage"])
        rec, norm = _norm(scores, start, teacher, min_gain)
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
            curves[label] = _curve(run_dir, m, start, teacher, score_of, totals, min_gain)

    return {
        "recipe": run["recipe"],
        "start": {"stage": plan["start"], "domains": start},
        "teachers": {d: {"stage": t, "score": teacher[d],
                         **({"status": TOO_SMALL} if gain_too_small(start.get(d), teacher[d], min_gain) else {})}
                     for d, t in teachers.items()},
        "min_teacher_gain": min_gain,
        "warnings": gain_warnings(start, teacher, teachers, min_gain),
        "methods": methods,
        "sample_efficiency": {k: [list(p) for p in v] for k, v in curves.items()},
    }


def build_compare(run_dir: Path, plan: dict[str, Any], seed_dirs: Sequence[Path] | None = None) -> dict[str, Any]:
    """Write the comparison files into `run_dir`; returns what compare.json holds.

    `seed_dirs`: the run directories of the seeds (default: `run_dir` alone, one seed). Every number is the mean
    over seeds; intervals resample seeds and held-out prompts (`report.compare_intervals`)."""
    run_dir = Path(run_dir)
    dirs = [Path(d) for d in seed_dirs] if seed_dirs else [run_dir]
    per_seed = [_seed_result(d, plan) for d in dirs]
    result = per_seed[0] if len(per_seed) == 1 else mean_over_seeds(per_seed)
    reference = plan.get("reference")
    add_intervals(result, compare_intervals(dirs, plan, reference), reference)
    if len(dirs) > 1:
        result["seed_dirs"] = [str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else str(d) for d in dirs]
    methods, teachers = result["methods"], result["teachers"]
    title = f"{result['recipe']}: normalized score by method" + (f" ({len(dirs)} seeds)" if len(dirs) > 1 else "")
    bands = result.get("sample_efficiency_bands", {})
    atomic_write(run_dir / "compare_bars.png", render_bars(methods, list(teachers), title))
    atomic_write(run_dir / "sample_efficiency.png",
                 render_sample_efficiency({k: [tuple(p) for p in v] for k, v in result["sample_efficiency"].items()},
                                          f"{result['recipe']}: sample efficiency", bands))
    atomic_write(run_dir / "compare.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(run_dir / "compare.md", _markdown(result, plan).encode("utf-8"))
    return result


def fmt_cell(mean: float | None, cell: dict | None) -> str:
    """`mean ±se [lo, hi]`: the mean, its evaluation standard error and its 95% interval; the mean alone when no
    interval was computed."""
    if mean is None or not cell or cell.get("ci") is None:
        return fmt_number(mean)
    se = "" if cell.get("se") is None else f" ±{cell['se']:.3f}"
    lo, hi = cell["ci"]
    return f"{mean:.3f}{se} [{lo:.3f}, {hi:.3f}]"


def fmt_difference(m: dict, reference: str | None, label: str) -> str:
    """The paired difference from the reference method, `*` when its interval excludes zero."""
    if label == reference:
        return "(reference)"
    diff = m.get("vs_reference")
    if not diff:
        return MISSING
    lo, hi = diff["ci"]
    return f"{diff['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if diff["significant"] else "")


def compare_table(result: dict[str, Any]) -> Table:
    domains = list(result["teachers"])
    iv = result.get("intervals")
    reference = iv["reference"] if iv else None
    diff_col = [f"vs {reference}"] if iv and reference else []
    headers = ["method", "stage", *domains, *(f"recovery: {d}" for d in domains), "normalized score", *diff_col,
               "student samples", "other samples", "wall"]
    start, teach = result["start"], result["teachers"]
    start_iv = start.get("intervals", {})
    rows = [
        ["start", start["stage"], *(fmt_cell(start["domains"].get(d), start_iv.get(d)) for d in domains),
         *([MISSING] * len(domains)), "0 (by definition)", *([""] * len(diff_col)), "", "", ""],
        ["teacher", ", ".join(t["stage"] for t in teach.values()),
         *(fmt_cell(teach[d]["score"], teach[d].get("interval")) for d in domains),
         *([MISSING] * len(domains)), "1 (by definition)", *([""] * len(diff_col)), "", "", ""],
    ]
    for label, m in result["methods"].items():
        doms = m["domains"]
        rows.append([
            f"**{label}**", m["stage"],
            *(fmt_cell(doms[d]["score"], doms[d].get("score_interval")) for d in domains),
            *(TOO_SMALL if teach[d].get("status") == TOO_SMALL
              else fmt_cell(doms[d]["recovery"], doms[d].get("recovery_interval")) for d in domains),
            f"**{fmt_cell(m['normalized_score'], m.get('normalized_interval'))}**",
            *([fmt_difference(m, reference, label)] if diff_col else []),
            f"{m['samples']:,}", f"{m['other_samples']:,}", fmt_duration(m["wall_seconds"]),
        ])
    notes = [
        "Scores: mean verifier reward on each domain's fixed held-out set (greedy). Recovery = (method - start) / "
        "(teacher - start); normalized score = mean recovery over domains (MOPD paper, arXiv 2606.30406).",
        "Student samples: rollouts sampled by the model being trained, summed over the method's stages after the "
        "start. Other samples: teacher traces (off-policy FT) and the samples of non-shared stages such as "
        "round-2 teachers. The shared start and round-1 teachers are not charged to any method.",
        "Wall: the method's own stages (a stage reused from an earlier run keeps its recorded time).",
    ]
    if iv:
        seeds = f"{iv['seeds']} seeds" if iv["seeds"] > 1 else "1 seed"
        prompts = ", ".join(f"{d} {n}" for d, n in iv["prompts"].items())
        notes.append(
            f"Intervals ({seeds}; held-out prompts: {prompts}): each cell is `mean ±se [lo, hi]`, the mean over "
            f"seeds, its evaluation standard error (prompts resampled, seeds fixed: the noise of a finite held-out "
            f"set) and a {iv['level']:.0%} percentile bootstrap interval ({iv['resamples']} replicates resampling "
            f"{iv['over']}; recovery is recomputed in each replicate, so the start's and teachers' noise counts).")
        if diff_col:
            notes.append(
                f"`vs {reference}`: the normalized score minus {reference}'s, with the interval of the paired "
                f"difference (both methods scored on the same resampled seeds and prompts); `*`: the interval "
                "excludes 0, a significant difference at the 5% level.")
        if iv["seeds"] < 5:
            notes.append(f"With {seeds} the intervals are too narrow: a percentile bootstrap over so few seeds "
                         "cannot see how far another seed could land; read them as a lower bound on the uncertainty.")
    notes += [f"**Warning**: {w}." for w in result.get("warnings", [])]
    for label, m in result["methods"].items():
        if len(m["stages"]) > 1:
            notes.append(f"`{label}` is charged for stages {', '.join(m['stages'])}.")
    return Table(headers, rows, notes)


def _markdown(result: dict[str, Any], plan: dict[str, Any]) -> str:
    out = [f"# Method comparison: {result['recipe']}\n", compare_table(result).markdown()]
    if dirs := result.get("seed_dirs"):
        out.append("## Per seed\n")
        out.append(Table(["method", *dirs], [
            [label, *(fmt_number(x) for x in m["per_seed"])] for label, m in result["methods"].items()
        ], ["Normalized score of each seed's run directory (each has its own compare.md)."]).markdown())
    out.append("![normalized score by method](compare_bars.png)\n")
    if result["sample_efficiency"]:
        out.append("## Sample efficiency\n")
        band = (" The band is a 95% bootstrap interval over seeds at each evaluation."
                if any(result.get("sample_efficiency_bands", {}).values()) else "")
        out.append("Normalized score against cumulative student samples for "
                   + ", ".join(f"`{k}`" for k in result["sample_efficiency"]) + "." + band + "\n")
        out.append("![sample efficiency](sample_efficiency.png)\n")
    return "\n".join(out)
