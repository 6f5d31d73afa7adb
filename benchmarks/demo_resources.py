"""Wall time and peak resident memory of the whole demo recipe, `mopd demo`, run as a child process.

    .venv/bin/python benchmarks/demo_resources.py [--out DIR] [--runs 1] [--recipe PATH] [--allocator-ab]
                                                  [--before REV]

Peak memory is the child's own maximum resident set size from `os.wait4` (ru_maxrss), so nothing else on the
machine counts towards it. Run it on a quiet machine: the wall time is what other load slows down. Writes
benchmarks/results.json (key "demo_resources").

`--allocator-ab` also runs the demo without the allocator setting that `mopd` applies to itself
(`mopd.runtime.keep_freed_memory`, replaced by a no-op in the child), alternating with the normal runs, and
reports both (key "demo_resources/allocator_ab").

`--before REV` alternates with runs of the same recipe (the checkout's demo.yaml unless `--recipe`) by the code
of git revision REV (checked out into a temporary worktree and imported from there), so a change's effect on
the whole demo is measured on one machine, in one invocation, on the same work (key
"demo_resources/before_after").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine
from trl_vs_mopd import update_results

# `python -m mopd`, with the allocator setting replaced by a no-op (the cli looks it up when a command starts)
WITHOUT_ALLOCATOR_SETTING = ("import mopd.runtime as r; r.keep_freed_memory = lambda: False; "
                             "from mopd.cli import app; app()")
REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "src" / "mopd" / "recipes" / "demo.yaml"


def run_demo(out: Path, recipe: Path | None = None, allocator_setting: bool = True,
             code: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `mopd demo --out out` (or `mopd run recipe --out out`), by the
    installed mopd or, with `code`, by the `mopd` package under that source directory."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    command = ["run", str(recipe)] if recipe else ["demo"]
    entry = ["-m", "mopd"] if allocator_setting else ["-c", WITHOUT_ALLOCATOR_SETTING]
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    proc = subprocess.Popen([sys.executable, *entry, *command, "--out", str(out)], env=env, cwd=out.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mopd demo failed:\n{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # macOS reports bytes
    return wall, kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--recipe", type=Path, default=None, help="time `mopd run RECIPE` instead of the demo")
    ap.add_argument("--allocator-ab", action="store_true",
                    help="alternate with runs that lack mopd's allocator setting, and report both")
    ap.add_argument("--before", default=None, metavar="REV",
                    help="alternate with runs of the same recipe by the code of git revision REV, and report both")
    args = ap.parse_args()
    if args.allocator_ab and args.before:
        raise SystemExit("--allocator-ab and --before are separate comparisons: pass one")
    # with --before, both codes run the same recipe file: the old code's own demo may be other work
    recipe = args.recipe.resolve() if args.recipe else (DEMO_RECIPE if args.before else None)
    # variant -> keyword arguments of run_demo; "this checkout" first
    variants: dict[str, dict] = {"this checkout": {}}
    if args.allocator_ab:
        variants["without allocator setting"] = {"allocator_setting": False}
    before = None  # the variant label of the old code's runs
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.before], check=True,
                                 capture_output=True, text=True).stdout.strip()
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", f"{tmp}/before", rev],
                           check=True, capture_output=True)
            before = f"code of {rev}"
            variants[before] = {"code": Path(tmp) / "before" / "src"}
        runs: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        out = (args.out or Path(tmp) / "demo").resolve()  # the child runs in out's parent directory
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            for i in range(args.runs):
                for v in list(variants) if i % 2 == 0 else list(variants)[::-1]:
                    runs[v].append(run_demo(out, recipe, **variants[v]))
                    print(f"run {i} {v}: {runs[v][-1][0]:.1f} s, {runs[v][-1][1]:.0f} MiB", flush=True)
        finally:
            if before:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", f"{tmp}/before"],
                               check=False, capture_output=True)

    def figures(rs: list[tuple[float, float]]) -> dict:
        walls, rss = [w for w, _ in rs], [r for _, r in rs]
        return {"wall_seconds": [round(w, 1) for w in walls], "peak_rss_mib": [round(r, 1) for r in rss],
                "median_wall_seconds": round(statistics.median(walls), 1),
                "max_peak_rss_mib": round(max(rss), 1), "under_4_gib": max(rss) < 4096}

    result = {"command": "python benchmarks/demo_resources.py " + " ".join(sys.argv[1:]), "machine": machine(),
              **figures(runs["this checkout"])}
    if args.allocator_ab:
        result["without_allocator_setting"] = figures(runs["without allocator setting"])
        result["speedup_from_allocator_setting"] = round(
            result["without_allocator_setting"]["median_wall_seconds"] / result["median_wall_seconds"], 2)
    if before:
        result["before"] = {"revision": rev, **figures(runs[before])}
        result["speedup_over_before"] = round(result["before"]["median_wall_seconds"] / result["median_wall_seconds"], 2)
    print(result)
    key = "demo_resources" if args.recipe is None else f"recipe_resources/{args.recipe.stem}"
    suffix = "/allocator_ab" if args.allocator_ab else "/before_after" if args.before else ""
    update_results(key + suffix, result)


if __name__ == "__main__":
    main()
