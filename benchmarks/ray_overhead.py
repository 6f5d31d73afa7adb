"""Ray's overhead on short stages (issue 36): the miniature recipe and the demo under `--executor ray` against the
local executor, with the code of --before (without the prestarted workers) and of --after (with them), in one
invocation.

    .venv/bin/python benchmarks/ray_overhead.py --before REV [--after HEAD] [--mini-runs 3] [--demo-runs 1]
        [--tag NAME]

Each run is a fresh `python -m mopd run RECIPE --out DIR --threads 1 [--executor ray]` process in a fresh
directory (Ray's start and shutdown included), with PYTHONPATH at the `src` of `--before` or `--after`, each
exported by `git archive` (so the checkout can change while it runs); the three commands of a recipe run in
rotating order, round after round, and the figures are medians. The local executor runs `--after`'s code (it is
not what changed). Besides the wall time: its split at the first stage's start and the last stage's end (Ray's
start and the first worker's imports come before; the report and Ray's shutdown after); when each
stage of the widest generation (the teachers) started, relative to the first of them, from run.json; and whether
every stage's final eval under Ray equals the local run's. Writes benchmarks/results.json key "ray_overhead"
(or "ray_overhead/<--tag>").
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import MINI_RECIPE  # noqa: E402

RECIPES = {"mini": ["teacher_add", "teacher_rev", "teacher_sort"],
           "demo": ["teacher_reversal", "teacher_sorting", "teacher_shift"]}  # the short teacher stages


def _source(rev: str, into: Path) -> Path:
    """REV's `src` tree, exported (no worktree: the repository is shared)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def _commit(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def _run(recipe: Path, out: Path, src: Path, ray: bool) -> dict[str, float]:
    """One fresh `mopd run`: its wall time, split at its first stage's start and its last stage's end (from
    run.json): before (the command's imports, Ray's start, the first worker's imports), the stages, after (the
    report, Ray's shutdown)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    where = subprocess.run([sys.executable, "-c", "import mopd; print(mopd.__file__)"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(src), (where, src)  # the side's code, not the editable install
    cmd = [sys.executable, "-m", "mopd", "run", str(recipe), "--out", str(out), "--threads", "1"]
    started, start = time.time(), time.perf_counter()
    done = subprocess.run(cmd + (["--executor", "ray"] if ray else []), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    info = json.loads((out / "run.json").read_text())["stages"].values()
    first, last = min(v["started_at"] for v in info), max(v["ended_at"] for v in info)
    return {"wall": round(wall, 1), "before_stages": round(first - started, 1), "stages": round(last - first, 1),
            "after_stages": round(started + wall - last, 1)}


def _starts(out: Path, stages: list[str]) -> list[float]:
    """Each of `stages`' start, in seconds after the first of them."""
    info = json.loads((out / "run.json").read_text())["stages"]
    first = min(info[s]["started_at"] for s in stages)
    return [round(info[s]["started_at"] - first, 1) for s in stages]


def _evals(out: Path) -> dict:
    """Each stage's final eval, from its lineage (its final checkpoint's mopd.json)."""
    info = json.loads((out / "run.json").read_text())["stages"]
    return {s: json.loads((out / s / "final" / "mopd.json").read_text())["metrics"].get("eval") for s in info
            if (out / s / "final" / "mopd.json").is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the revision without prestarted workers (any git rev)")
    ap.add_argument("--after", default="HEAD", help="the revision with them")
    ap.add_argument("--mini-runs", type=int, default=3)
    ap.add_argument("--demo-runs", type=int, default=1)
    ap.add_argument("--tag", default=None, help="results.json sub-key")
    args = ap.parse_args()
    result: dict = {"machine": _common.machine(), "load_average_at_start": os.getloadavg(),
                    "command": f"benchmarks/ray_overhead.py --before {args.before} --after {args.after} "
                               f"--mini-runs {args.mini_runs} --demo-runs {args.demo_runs}",
                    "revisions": {side: _commit(rev) for side, rev in (("before", args.before), ("after", args.after))}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        after = _source(args.after, root / "after")
        sides = {"local": (after, False), "ray before": (_source(args.before, root / "before"), True),
                 "ray after": (after, True)}
        (root / "mini.yaml").write_text(MINI_RECIPE)
        recipes = {"mini": (root / "mini.yaml", args.mini_runs),
                   "demo": (ROOT / "src" / "mopd" / "recipes" / "demo.yaml", args.demo_runs)}
        names = list(sides)
        for recipe, (path, runs) in recipes.items():
            if runs < 1:
                continue
            walls: dict[str, list[float]] = {n: [] for n in names}
            parts: dict[str, list[dict]] = {n: [] for n in names}
            starts: dict[str, list[list[float]]] = {n: [] for n in names}
            same = True
            for r in range(runs):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    out = root / f"{recipe}-{r}-{names.index(name)}"
                    parts[name].append(_run(path, out, *sides[name]))
                    walls[name].append(parts[name][-1]["wall"])
                    starts[name].append(_starts(out, RECIPES[recipe]))
                    print(f"{recipe} round {r} {name}: {parts[name][-1]}, {RECIPES[recipe]} started at "
                          f"{starts[name][-1]} s", flush=True)
                local = _evals(root / f"{recipe}-{r}-0")
                same = same and all(_evals(root / f"{recipe}-{r}-{i}") == local for i in (1, 2))
            medians = {n: statistics.median(w) for n, w in walls.items()}
            result[recipe] = {
                "runs": runs, "wall_seconds": walls, "median_seconds": {n: round(m, 1) for n, m in medians.items()},
                "ray_over_local": {n: round(medians[n] / medians["local"], 2) for n in ("ray before", "ray after")},
                "after_over_before": round(medians["ray after"] / medians["ray before"], 2),
                "median_split_seconds": {n: {k: statistics.median(p[k] for p in parts[n]) for k in parts[n][0]}
                                         for n in names},
                "split_seconds": parts, "widest_generation_starts_s": starts, "every_eval_equal_to_local": same,
            }
    result["load_average_at_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    update_results("ray_overhead" + (f"/{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
