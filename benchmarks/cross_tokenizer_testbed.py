"""The cross-tokenizer testbed's figures: character-level students of BPE teachers against the demo's student of
character teachers, on the same seeds (docs/CROSS_TOKENIZER.md, docs/RESULTS.md).

    .venv/bin/python benchmarks/cross_tokenizer_testbed.py [--seeds 0 1 2] [--out runs/xtok] [--threads 2]
        [--teachers-only] [--objective OBJ]

Runs the bundled `compare_cross_tokenizer` recipe once per seed (`seed: k`, into OUT/seed-k; finished stages are
skipped, so a second call only adds what is missing; `--teachers-only` runs the two teacher pipelines and leaves
the students for a later call). Per seed and student (`student`: char teachers; `student_xtok`: BPE teachers;
`student_mixed`: one BPE teacher and two char ones) it reads the held-out scores and computes the normalized
score against the student's own teachers (recovery of each teacher's gain over `sft`, the students' start;
domains whose teacher gained under 0.05 left out, as the report does), then the ratio of each student's normalized
score to the same-tokenizer student's on the same seed. Means over seeds with 95% bootstrap intervals over seeds.
`--objective` sets every student's objective (the recipe's is the demo's, full_reverse_kl).
Writes benchmarks/cross_tokenizer_testbed.json (with --objective: ..._<objective>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from mopd.report.run_files import read_final_eval
from mopd.report.scores import normalized_score, recovery
from mopd.report.stats import mean_interval

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "src" / "mopd" / "recipes" / "compare_cross_tokenizer.yaml"
STUDENTS = ("student", "student_xtok", "student_mixed")
START = "sft"
CONTROL = "student_lineage"
LINEAGE_SEED = 1000  # the control's character pipeline pretrains from seed + this


def with_lineage_control(data: dict, seed: int) -> dict:
    """The control for lineage: a second character pipeline (the demo's stages, `_lineage`) whose base pretrains
    from another seed, and a student of its teachers. Its teachers share the student's tokenizer but not its
    lineage, as every teacher of another tokenizer does not: a student of BPE teachers that falls short where this
    one does not is short for its teachers' tokenizer; one that falls short where this one does too, for lineage."""
    stages = data["stages"]
    pipeline = ["base", "sft", *(f"sft_{d}" for d in data["domains"]), *(f"teacher_{d}" for d in data["domains"])]
    for name in pipeline:
        stage = dict(stages[name])
        if "init" in stage:
            stage["init"] = f"{stage['init']}_lineage"
        if name == "base":
            stage["seed"] = seed + LINEAGE_SEED
        stages[f"{name}_lineage"] = stage
    student = dict(stages["student"])
    student["teachers"] = {d: f"teacher_{d}_lineage" for d in data["domains"]}
    stages[CONTROL] = student
    return data


def recipe_for(recipe: Path, seed: int, teachers_only: bool, objective: str | None) -> dict:
    data = yaml.safe_load(recipe.read_text())
    data["seed"] = seed
    for name in list(data["stages"]):
        stage = data["stages"][name]
        if stage["kind"] == "mopd":
            if teachers_only:
                del data["stages"][name]
            elif objective:
                stage["objective"] = objective
    if teachers_only:
        data.pop("report", None)
    return data


def teacher_names(data: dict, student: str) -> dict[str, str]:
    return {d: (t if isinstance(t, str) else t["stage"]) for d, t in data["stages"][student]["teachers"].items()}


def scores(stage_dir: Path) -> dict[str, float] | None:
    evals = read_final_eval(stage_dir)
    return None if evals is None else {d: v["score"] for d, v in evals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "xtok")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teachers-only", action="store_true")
    parser.add_argument("--objective", default=None)
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--lineage-control", action="store_true",
                        help="add a character pipeline of another pretraining seed and its student (`student_lineage`)")
    args = parser.parse_args()
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        out = args.out / f"seed-{seed}"
        out.mkdir(parents=True, exist_ok=True)
        data = recipe_for(args.recipe, seed, args.teachers_only, args.objective)
        if args.lineage_control and not args.teachers_only:
            data = with_lineage_control(data, seed)
        path = out / "recipe.in.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "mopd", "run", str(path), "--out", str(out), "--threads",
                        str(args.threads)], check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - t0
        stages = {name: scores(out / name) for name in data["stages"]}
        row: dict = {"wall_s": round(wall, 1), "scores": stages}
        if not args.teachers_only:
            start = stages[START] or {}
            for student in (s for s in (*STUDENTS, CONTROL) if s in data["stages"]):
                teachers = teacher_names(data, student)
                rec = {d: recovery(start.get(d), (stages[t] or {}).get(d), (stages[student] or {}).get(d))
                       for d, t in teachers.items()}
                row[student] = {"recovery": rec, "normalized": normalized_score(rec.values())}
        per_seed[seed] = row
        print(json.dumps({seed: row}, indent=1), flush=True)
    result: dict = {"command": "benchmarks/cross_tokenizer_testbed.py " + " ".join(sys.argv[1:]),
                    "machine": platform.processor() or platform.machine(), "seeds": per_seed}
    if not args.teachers_only:
        summary = {}
        base = np.array([per_seed[s]["student"]["normalized"] for s in args.seeds], dtype=float)
        for student in (s for s in (*STUDENTS, CONTROL) if all(s in per_seed[k] for k in args.seeds)):
            norm = np.array([per_seed[s][student]["normalized"] for s in args.seeds], dtype=float)
            summary[student] = {"normalized_mean": float(norm.mean()), "normalized_interval": mean_interval(norm),
                                "ratio_to_same_tokenizer": float((norm / base).mean()),
                                "ratio_interval": mean_interval(norm / base)}
        result["summary"] = summary
    suffix = f"_{args.objective}" if args.objective else ""
    name = "cross_tokenizer_teachers.json" if args.teachers_only else f"cross_tokenizer_testbed{suffix}.json"
    (Path(__file__).resolve().parent / name).write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
