"""Wall time and peak resident memory of the whole demo recipe, `mopd demo`, run as a child process.

    .venv/bin/python benchmarks/demo_resources.py [--out DIR] [--runs 1] [--recipe PATH] [--allocator-ab]

Peak memory is the child's own maximum resident set size from `os.wait4` (ru_maxrss), so nothing else on the
machine counts towards it. Run it on a quiet machine: the wall time is what other load slows down. Writes
benchmarks/results.json (key "demo_resources").

`--allocator-ab` also runs the demo without the allocator setting that `mopd` applies to itself
(`mopd.runtime.keep_freed_memory`, replaced by a no-op in the child), alternating with the normal runs, and
reports both (key "demo_resources/allocator_ab").
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


def run_demo(out: Path, recipe: Path | None = None, allocator_setting: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `mopd demo --out out` (or `mopd run recipe --out out`)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    command = ["run", str(recipe)] if recipe else ["demo"]
    entry = ["-m", "mopd"] if allocator_setting else ["-c", WITHOUT_ALLOCATOR_SETTING]
    proc = subprocess.Popen([sys.executable, *entry, *command, "--out", str(out)],
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
    args = ap.parse_args()
    variants = (True, False) if args.allocator_ab else (True,)
    runs: dict[bool, list[tuple[float, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        for i in range(args.runs):
            for v in variants if i % 2 == 0 else variants[::-1]:
                runs[v].append(run_demo(out, args.recipe, allocator_setting=v))
                print(f"run {i} allocator setting {'on' if v else 'off'}: {runs[v][-1][0]:.1f} s, "
                      f"{runs[v][-1][1]:.0f} MiB", flush=True)

    def figures(rs: list[tuple[float, float]]) -> dict:
        walls, rss = [w for w, _ in rs], [r for _, r in rs]
        return {"wall_seconds": [round(w, 1) for w in walls], "peak_rss_mib": [round(r, 1) for r in rss],
                "median_wall_seconds": round(statistics.median(walls), 1),
                "max_peak_rss_mib": round(max(rss), 1), "under_4_gib": max(rss) < 4096}

    result = {"command": "python benchmarks/demo_resources.py " + " ".join(sys.argv[1:]), "machine": machine(),
              **figures(runs[True])}
    if args.allocator_ab:
        result["without_allocator_setting"] = figures(runs[False])
        result["speedup_from_allocator_setting"] = round(
            result["without_allocator_setting"]["median_wall_seconds"] / result["median_wall_seconds"], 2)
    print(result)
    key = "demo_resources" if args.recipe is None else f"recipe_resources/{args.recipe.stem}"
    update_results(key + ("/allocator_ab" if args.allocator_ab else ""), result)


if __name__ == "__main__":
    main()
