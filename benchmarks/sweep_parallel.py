"""`mopd sweep` one point after another against `mopd sweep --executor ray` (issue 19, item 2), on this machine.

    .venv/bin/python benchmarks/sweep_parallel.py [--runs 3] [--scale 0.25] [--values 5e-4,1e-3,2e-3] [--seeds 2]

The demo recipe at `--scale`, swept over the student's lr for `--seeds` seeds, from nothing finished (each run in a
fresh directory, each a fresh `mopd sweep` process, Ray's start included): the local executor at one torch
thread per core (`--threads N`, its best use of the cores) and at one thread, against Ray with one variant per
core at one thread each. The variants of a seed share their parents: on Ray the seeds' first points (the whole
recipe) run at the same time, then the other points' students. Commands in rotating order; medians over
`--runs`. Checks that Ray's points score exactly what the local executor's do at the same thread count, and
writes benchmarks/results.json key "sweep_parallel" (or "sweep_parallel/<--tag>").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from trl_vs_mopd import update_results

from mopd.cli_tools.bundled import bundled_recipe
from mopd.cli_tools.scaled import with_scale
from mopd.recipe.load import load_recipe

MOPD = str(Path(sys.executable).with_name("mopd"))


def _sweep(recipe: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> float:
    cmd = [MOPD, "sweep", str(recipe), "--set", f"student.lr={args.values}", "--seeds", str(args.seeds),
           "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _scores(out: Path) -> dict[str, list]:
    """Every point's per-seed student evaluation (scores per domain), from the sweep's run directories."""
    found = {}
    for p in json.loads((out / "sweep.json").read_text())["points"]:
        found[p["name"]] = [json.loads((out / d / "student" / "final" / "mopd.json").read_text())["metrics"]["eval"]
                            for d in p["seed_dirs"]]
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--values", default="5e-4,1e-3,2e-3", help="the student lr values swept")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tag", default=None, help="results.json sub-key (default: from the CPU)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    commands = {f"local, --threads {cores}": ["--threads", str(cores)], "local, --threads 1": ["--threads", "1"],
                "ray, 1 thread per variant": ["--executor", "ray", "--threads", "1"]}
    walls: dict[str, list[float]] = {k: [] for k in commands}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = with_scale(load_recipe(bundled_recipe("demo")), args.scale, root / "recipe").path
        names = list(commands)
        for run in range(args.runs):
            for name in names[run % len(names):] + names[:run % len(names)]:
                out = root / f"{run}-{names.index(name)}"
                walls[name].append(_sweep(recipe, out, args, commands[name]))
                print(f"run {run} {name}: {walls[name][-1]:.1f}s", flush=True)
        same = _scores(root / "0-1") == _scores(root / "0-2")  # local and Ray, both at one thread
    medians = {k: statistics.median(v) for k, v in walls.items()}
    ray = medians["ray, 1 thread per variant"]
    result = {
        "machine": _common.machine(),
        "command": f"benchmarks/sweep_parallel.py --runs {args.runs} --scale {args.scale} --values {args.values} "
                   f"--seeds {args.seeds}",
        "variants": len(args.values.split(",")) * args.seeds,
        "wall_seconds": {k: [round(w, 1) for w in v] for k, v in walls.items()},
        "median_seconds": {k: round(v, 1) for k, v in medians.items()},
        "ray_speedup": {k: round(v / ray, 2) for k, v in medians.items()},
        "ray_scores_equal_local_one_thread": same,
    }
    print(json.dumps(result, indent=2))
    update_results("sweep_parallel" + (f"/{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
