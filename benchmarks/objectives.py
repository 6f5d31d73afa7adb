"""Every MOPD objective on the same recipe: normalized score, per-domain recovery, wall time of the MOPD stage.

    .venv/bin/python benchmarks/objectives.py [--recipe PATH] [--out DIR] [--from-run DIR] [--json PATH]
        [--objectives sampled,jsd] [--lrs 3e-4,1e-3,3e-3] [--sampled-temperatures 0.5,1.0]

With `--lrs` (and, for the sampled-token estimator, `--sampled-temperatures`) every objective runs at each
setting and the table adds each objective at its best setting, so objectives are compared at their own best
rather than at one shared learning rate.

Writes one recipe holding the stages the student depends on (unchanged) and one copy of the student per
objective (sampled, topk with k = 16, full_reverse_kl, forward_kl, jsd) that differs only in `objective`
(and `topk`), named `<student>_<objective>`, and runs it into --out. The runner skips finished stages whose
identity matches, so base, SFT and teachers are trained once (or not at all: --from-run copies the finished
stages of an earlier run, e.g. `runs/demo`, into --out first) and only the students run. Recovery is measured
against each student's own start and its teachers, as in the report. Writes --json (default
benchmarks/objectives.json) with the rows and the markdown table, and prints the table.

Default recipe: the bundled demo (minutes per student on a laptop CPU). A quick check of the script itself:
    .venv/bin/python benchmarks/objectives.py --recipe my_mini.yaml --out /tmp/obj --json /tmp/obj.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from mopd.core.schema import MOPDStage
from mopd.execution.runner import run_recipe
from mopd.recipe.load import LoadedRecipe, load_recipe
from mopd.recipe.refs import resolve_external, stage_refs
from mopd.report.run_files import read_final_eval
from mopd.report.scores import normalized_score, recovery

ROOT = Path(__file__).resolve().parent.parent
# objective name -> the student settings that select it
OBJECTIVES: dict[str, dict[str, Any]] = {
    "sampled": {"objective": "sampled"},
    "topk": {"objective": "topk", "topk": 16},
    "full_reverse_kl": {"objective": "full_reverse_kl"},
    "forward_kl": {"objective": "forward_kl"},
    "jsd": {"objective": "jsd"},
}


def pick_student(loaded: LoadedRecipe, name: str | None) -> str:
    recipe = loaded.recipe
    mopd = [s for s in loaded.order if isinstance(recipe.stages[s], MOPDStage)]
    student = name or recipe.report.student or (mopd[-1] if mopd else None)
    if student not in mopd:
        raise SystemExit(f"{loaded.path}: {student!r} is not a mopd stage (mopd stages: {', '.join(mopd) or 'none'})")
    return student


def ancestors(loaded: LoadedRecipe, stage: str) -> list[str]:
    """The stages `stage` depends on, in the recipe's dependency order."""
    stages, need, todo = loaded.recipe.stages, set(), [stage]
    while todo:
        for _, ref in stage_refs(stages[todo.pop()]):
            if ref in stages and ref not in need:
                need.add(ref)
                todo.append(ref)
    return [s for s in loaded.order if s in need]


def grid(objectives: list[str], lrs: list[float] | None,
         sampled_temperatures: list[float] | None) -> dict[str, dict[str, Any]]:
    """suffix -> the student settings of one point: each objective at each lr (and the sampled estimator at each
    temperature). Without lrs or temperatures the suffix is the objective alone (one point per objective)."""
    points: dict[str, dict[str, Any]] = {}
    for objective in objectives:
        temps = sampled_temperatures if objective == "sampled" and sampled_temperatures else [None]
        for lr in lrs or [None]:
            for temp in temps:
                suffix = objective + (f"_lr{lr:g}" if lr is not None else "") + (f"_t{temp:g}" if temp else "")
                points[suffix] = {**OBJECTIVES[objective], **({"lr": lr} if lr is not None else {}),
                                  **({"temperature": temp} if temp else {})}
    return points


def variant_recipe(loaded: LoadedRecipe, student: str, points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The recipe with the student's ancestors unchanged and one student copy per point of `grid`."""
    raw = yaml.safe_load(loaded.path.read_text())
    base = loaded.path.parent

    def absolute(ref: str) -> str:  # the variant recipe lives elsewhere: pin relative external references
        return resolve_external(ref, base) or ref

    raw["plugins"] = [str((base / p).resolve()) for p in raw.get("plugins") or []]
    stages = {}
    for name in ancestors(loaded, student):
        stage = dict(raw["stages"][name])
        if "init" in stage and stage["init"] not in raw["stages"]:
            stage["init"] = absolute(stage["init"])
        if isinstance(stage.get("teachers"), dict):
            stage["teachers"] = {d: t if t in raw["stages"] else absolute(t) for d, t in stage["teachers"].items()}
        stages[name] = stage
    original = dict(raw["stages"][student])
    for key in ("init",):
        if original[key] not in raw["stages"]:
            original[key] = absolute(original[key])
    original["teachers"] = {d: t if t in raw["stages"] else absolute(t) for d, t in original["teachers"].items()}
    for suffix, settings in points.items():
        stage = {k: v for k, v in original.items() if k not in ("objective", "topk")}
        if settings["objective"] != "sampled":
            stage.pop("surprise_alpha", None)  # sampled-token reweighting; the other objectives refuse it
        stages[f"{student}_{suffix}"] = {**stage, **settings}
    raw["stages"] = stages
    raw.pop("compare", None)  # a comparison recipe's methods are not stages of the variant
    raw["name"] = f"{raw['name']}-objectives"
    raw["report"] = {"student": f"{student}_{next(iter(points))}"}
    return raw


def copy_finished(src: Path, out: Path, stages: list[str]) -> list[str]:
    """Copy the finished stage directories of an earlier run; the runner still checks their identities."""
    copied = []
    for name in stages:
        if (src / name / "final" / "mopd.json").is_file() and not (out / name).exists():
            shutil.copytree(src / name, out / name)
            copied.append(name)
    return copied


def results(out: Path, loaded: LoadedRecipe, student: str, points: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    run = json.loads((out / "run.json").read_text())
    spec: MOPDStage = loaded.recipe.stages[student]
    domains = [d for d in loaded.recipe.domains if d in spec.teachers]

    def score(stage: str, domain: str) -> float | None:
        ev = read_final_eval(out / stage) or {}
        return ev.get(domain, {}).get("score")

    rows = []
    for suffix, settings in points.items():
        name, objective = f"{student}_{suffix}", settings["objective"]
        rec = {d: recovery(score(spec.init, d), score(spec.teachers[d], d), score(name, d)) for d in domains}
        rows.append({
            "objective": objective + (" (k=16)" if objective == "topk" else ""),
            "lr": settings.get("lr", spec.lr),
            "temperature": settings.get("temperature", spec.temperature),
            "stage": name,
            "normalized_score": normalized_score(rec.values()),
            "recovery": rec,
            "score": {d: score(name, d) for d in domains},
            "mopd_wall_seconds": run["stages"][name].get("wall_seconds"),
            "status": run["stages"][name].get("status"),
        })
    return rows


def best_per_objective(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each objective's row with the highest normalized score (rows without a score lose)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = r["objective"]
        value = r["normalized_score"] if r["normalized_score"] is not None else float("-inf")
        if key not in best or value > (best[key]["normalized_score"] or float("-inf")):
            best[key] = r
    return list(best.values())


def markdown(rows: list[dict[str, Any]]) -> str:
    domains = list(rows[0]["recovery"]) if rows else []

    def f(x: float | None, nd: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{nd}f}"

    def table(rs: list[dict[str, Any]]) -> list[str]:
        lines = ["| objective | lr | temperature | normalized score | "
                 + " | ".join(f"recovery: {d}" for d in domains) + " | MOPD wall (s) |",
                 "|---" * (len(domains) + 5) + "|"]
        for r in rs:
            lines.append(f"| {r['objective']} | {r['lr']:g} | {r['temperature']:g} | {f(r['normalized_score'])} | "
                         + " | ".join(f(r["recovery"][d]) for d in domains) + f" | {f(r['mopd_wall_seconds'], 1)} |")
        return lines

    lines = table(rows)
    if len(rows) > len({r["objective"] for r in rows}):  # a grid: each objective at its best setting
        lines += ["", "Each objective at its best setting:", "", *table(best_per_objective(rows))]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=Path(str(resources.files("mopd") / "recipes" / "demo.yaml")))
    ap.add_argument("--student", default=None, help="the MOPD stage to vary (default: the report's student)")
    ap.add_argument("--out", type=Path, default=Path("runs/objectives"))
    ap.add_argument("--from-run", type=Path, default=None, help="copy finished stages from this run dir first")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "objectives.json")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset of: "
                    + ", ".join(OBJECTIVES))
    ap.add_argument("--lrs", default=None, help="comma-separated learning rates: every objective at each")
    ap.add_argument("--sampled-temperatures", default=None,
                    help="comma-separated sampling temperatures for the sampled-token objective")
    args = ap.parse_args()
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    if bad := [o for o in objectives if o not in OBJECTIVES]:
        raise SystemExit(f"--objectives: unknown {', '.join(bad)} (known: {', '.join(OBJECTIVES)})")
    try:
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
        temps = [float(x) for x in args.sampled_temperatures.split(",")] if args.sampled_temperatures else None
    except ValueError as e:
        raise SystemExit(f"--lrs / --sampled-temperatures: {e}") from None
    if any(x <= 0 for x in (lrs or []) + (temps or [])):
        raise SystemExit("--lrs / --sampled-temperatures: values must be positive")
    points = grid(objectives, lrs, temps)

    loaded = load_recipe(args.recipe)
    student = pick_student(loaded, args.student)
    args.out.mkdir(parents=True, exist_ok=True)
    variant_path = args.out / "objectives_recipe.yaml"
    variant_path.write_text(yaml.safe_dump(variant_recipe(loaded, student, points), sort_keys=False))
    variants = load_recipe(variant_path)
    if args.from_run:
        copied = copy_finished(args.from_run, args.out, ancestors(loaded, student))
        print(f"copied finished stages from {args.from_run}: {', '.join(copied) or 'none'}")
    t0 = time.time()
    run_recipe(variants, args.out)
    rows = results(args.out, loaded, student, points)
    table = markdown(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "recipe": str(args.recipe),
        "student": student,
        "out": str(args.out),
        "total_seconds": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "rows": rows,
        "best_per_objective": best_per_objective(rows),
        "table_markdown": table,
    }, indent=2) + "\n")
    print(table)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
