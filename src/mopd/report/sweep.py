"""The report of `mopd sweep`: each grid point's normalized score with its 95% interval, one table and one plot
per swept key, and the best setting per distillation objective; and over every point a directory holds, from
all the sweeps run into it, one table sorted by score (sweep_all.md/json).

A point's score is the normalized score of the recipe's report student in each of the point's seed run
directories (recovery against the student's start and teachers, as report.md computes it), averaged over seeds;
its interval resamples seeds and held-out prompts and its ± is the evaluation standard error
(`report.compare_intervals`). Reads only the run directories' files, from the plain description the recipe
layer passes in (`experiments.sweep`).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mopd.report.build import atomic_write
from mopd.report.compare import fmt_cell
from mopd.report.compare_intervals import compare_intervals
from mopd.report.run_files import read_final_eval
from mopd.report.scores import MIN_TEACHER_GAIN, gain_warnings, normalized_score, recovery
from mopd.report.tables import MISSING, Table

DPI = 110


def _seed_score(run_dir: Path, point: dict[str, Any]) -> dict[str, Any]:
    """One seed's normalized score, with each domain's start, teacher and student scores and recovery."""
    def scores(stage: str) -> dict[str, float | None]:
        return {d: v.get("score") for d, v in (read_final_eval(run_dir / stage) or {}).items()}

    start, student = scores(point["start"]), scores(point["student"])
    teacher = {d: scores(t).get(d) for d, t in point["teachers"].items()}
    min_gain = float(point.get("min_teacher_gain", MIN_TEACHER_GAIN))
    domains = {d: {"start": start.get(d), "teacher": teacher[d], "student": student.get(d),
                   "recovery": recovery(start.get(d), teacher[d], student.get(d), min_gain)} for d in teacher}
    return {"normalized_score": normalized_score(v["recovery"] for v in domains.values()), "domains": domains,
            "warnings": gain_warnings(start, teacher, point["teachers"], min_gain)}


def score_point(out: Path, point: dict[str, Any]) -> dict[str, Any]:
    """The point with its per-seed and mean normalized score, its interval cell, and each seed's domains."""
    dirs = [Path(out) / d for d in point["seed_dirs"]]
    seeds = [_seed_score(d, point) for d in dirs]
    per_seed = [s["normalized_score"] for s in seeds]
    mean = None if any(x is None for x in per_seed) else sum(per_seed) / len(per_seed)  # type: ignore[misc]
    plan = {"start": point["start"], "teachers": point["teachers"],
            "methods": {"student": {"stage": point["student"]}},
            "min_teacher_gain": point.get("min_teacher_gain", MIN_TEACHER_GAIN)}
    cell = compare_intervals(dirs, plan, None)["methods"].get("student", {}).get("normalized")
    warned = list(dict.fromkeys(w for s in seeds for w in s["warnings"]))
    return {**point, "normalized_score": mean, "per_seed": per_seed, "interval": cell,
            "per_seed_domains": [s["domains"] for s in seeds], "warnings": warned}


def best_per_objective(points: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """objective -> the point with the highest mean normalized score among the points with that objective."""
    best: dict[str, dict[str, Any]] = {}
    for p in points:
        if p["normalized_score"] is None:
            continue
        key = str(p["objective"])
        if key not in best or p["normalized_score"] > best[key]["normalized_score"]:
            best[key] = {"point": p["name"], "settings": p["settings"], "normalized_score": p["normalized_score"],
                         "interval": p["interval"]}
    return best


def _others(point: dict[str, Any], key: str) -> str:
    return ", ".join(f"{k}={t}" for k, t in point["settings"].items() if k != key) or "score"


def key_table(points: list[dict[str, Any]], key: str, values: list[str]) -> Table:
    """Rows: the key's values; columns: each setting of the other swept keys."""
    columns = list(dict.fromkeys(_others(p, key) for p in points))
    cell = {(p["settings"][key], _others(p, key)): fmt_cell(p["normalized_score"], p["interval"]) for p in points}
    rows = [[f"`{v}`", *(cell.get((v, c), MISSING) for c in columns)] for v in values]
    return Table([key, *columns], rows)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        xs = [float(v) for v in values]
    except ValueError:
        return None
    return xs if all(math.isfinite(x) for x in xs) else None


def render_key_plot(points: list[dict[str, Any]], key: str, values: list[str], title: str) -> bytes:
    """Normalized score against the key's values (log scale when they are positive numbers spanning more than a
    factor of 10), one line with 95% error bars per setting of the other keys."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nums = _numeric(values)
    log = nums is not None and min(nums) > 0 and max(nums) / min(nums) > 10
    xs = nums if nums is not None else list(range(len(values)))
    fig = Figure(figsize=(6.4, 4.2), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, other in enumerate(dict.fromkeys(_others(p, key) for p in points)):
        line = [(xs[values.index(p["settings"][key])], p) for p in points
                if _others(p, key) == other and p["normalized_score"] is not None]
        if not line:
            continue
        ys = [p["normalized_score"] for _, p in line]
        cis = [(p["interval"] or {}).get("ci") or [y, y] for y, (_, p) in zip(ys, line, strict=True)]
        err = [[max(0.0, y - ci[0]) for y, ci in zip(ys, cis, strict=True)],
               [max(0.0, ci[1] - y) for y, ci in zip(ys, cis, strict=True)]]
        ax.errorbar([x for x, _ in line], ys, yerr=err, marker="o", markersize=4, capsize=3, label=other,
                    color=f"C{i}")
    if log:
        ax.set_xscale("log")
    ax.set_xticks(xs, values)
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1)
    ax.set_xlabel(key)
    ax.set_ylabel("normalized score (95% interval)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_name(key: str) -> str:
    return "sweep_" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".png"


def build_sweep(out: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Write sweep.md, sweep.json and one plot per key into `out`; returns what sweep.json holds. `spec`:
    {"recipe", "keys", "values": {key: [as typed]}, "seeds", "points": [{"name", "settings", "seed_dirs",
    "start", "teachers", "student", "objective"}]}."""
    out = Path(out)
    points = [score_point(out, p) for p in spec["points"]]
    result = {**spec, "points": points, "best": best_per_objective(points),
              "plots": {k: plot_name(k) for k in spec["keys"]}}
    for key in spec["keys"]:
        atomic_write(out / plot_name(key), render_key_plot(points, key, spec["values"][key],
                                                          f"{spec['recipe']}: sweep of {key}"))
    atomic_write(out / "sweep.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(out / "sweep.md", sweep_markdown(result).encode("utf-8"))
    return result


def best_lines(best: dict[str, dict[str, Any]]) -> list[str]:
    """One line per objective: its best point's settings and score cell."""
    lines = [f"- objective `{objective}`: " + ", ".join(f"`{k}={t}`" for k, t in b["settings"].items())
             + f": {fmt_cell(b['normalized_score'], b['interval'])}" for objective, b in best.items()]
    return lines or ["- no point has a defined score (did the teachers beat the start?)"]


def sweep_markdown(result: dict[str, Any]) -> str:
    seeds = result["seeds"]
    lines = [f"# Sweep: {result['recipe']}\n",
             f"{len(result['points'])} points x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
             f"({', '.join(map(str, seeds))}). Score: the normalized score of the report's student (mean recovery "
             "of its teachers' gains). Each cell is `mean ±se [lo, hi]`: the mean over seeds, its evaluation "
             "standard error and a 95% bootstrap interval over seeds and held-out prompts (see README, "
             "\"Seeds, intervals and significance\").\n", "## Best setting per objective\n"]
    lines += best_lines(result["best"])
    lines.append("")
    warned = [f"- **Warning** (`{p['name']}`): {w}." for p in result["points"] for w in p.get("warnings", [])]
    if warned:
        lines += ["## Domains left out (teacher gain too small)\n", *warned, ""]
    for key in result["keys"]:
        lines.append(f"## {key}\n")
        lines.append(key_table(result["points"], key, result["values"][key]).markdown())
        lines.append(f"![{key}]({result['plots'][key]})\n")
    lines.append("## Every point\n")
    rows = [[p["name"], str(p["objective"]), fmt_cell(p["normalized_score"], p["interval"]),
             " ".join("—" if x is None else f"{x:.3f}" for x in p["per_seed"]), ", ".join(p["seed_dirs"])]
            for p in result["points"]]
    lines.append(Table(["point", "objective", "normalized score", "per seed", "run directories"], rows).markdown())
    return "\n".join(lines)


def build_sweep_history(out: Path, spec: dict[str, Any], scored: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write sweep_all.md and sweep_all.json into `out`: every point of every sweep run into it, each scored as in
    sweep.md, sorted by mean normalized score, with the best per objective. `spec`: {"recipe", "points"}, the
    points as `build_sweep` takes them; a point of `scored` (as `score_point` returns it) with the same name and
    run directories is taken as it is."""
    out = Path(out)
    done = {(p["name"], tuple(p["seed_dirs"])): p for p in scored}
    points = [done.get((p["name"], tuple(p["seed_dirs"]))) or score_point(out, p) for p in spec["points"]]
    points.sort(key=lambda p: (p["normalized_score"] is None, -(p["normalized_score"] or 0.0), p["name"]))
    result = {**spec, "points": points, "best": best_per_objective(points)}
    atomic_write(out / "sweep_all.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(out / "sweep_all.md", history_markdown(result).encode("utf-8"))
    return result


def history_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Every sweep point: {result['recipe']}\n",
             f"{len(result['points'])} points, from every `mopd sweep` run into this directory, best first. Each "
             "cell is `mean ±se [lo, hi]` over the point's seeds, as in sweep.md (which covers the last "
             "invocation's points only).\n", "## Best setting per objective\n"]
    lines += best_lines(result["best"])
    lines.append("\n## Every point\n")
    rows = [[p["name"], str(p["objective"]), fmt_cell(p["normalized_score"], p["interval"]),
             " ".join("—" if x is None else f"{x:.3f}" for x in p["per_seed"]), str(len(p["seed_dirs"]))]
            for p in result["points"]]
    lines.append(Table(["point", "objective", "normalized score", "per seed", "seeds"], rows).markdown())
    return "\n".join(lines)
