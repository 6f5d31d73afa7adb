"""Wall time and peak resident memory of the whole demo recipe, `mopd demo`, run as a child process.

    .venv/bin/python benchmarks/demo_resources.py [--out DIR] [--runs 1] [--recipe PATH]

Peak memory is the child's own maximum resident set size from `os.wait4` (ru_maxrss), so nothing else on the
machine counts towards it. Run it on a quiet machine: the wall time is what other load slows down. Writes
benchmarks/results.json (key "demo_resources").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trl_vs_mopd import update_results


def run_demo(out: Path, recipe: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one `mopd demo --out out` (or `mopd run recipe --out out`)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    command = ["run", str(recipe)] if recipe else ["demo"]
    proc = subprocess.Popen([sys.executable, "-m", "mopd", *command, "--out", str(out)],
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        runs = [run_demo(out, args.recipe) for _ in range(args.runs)]
    walls, rss = [w for w, _ in runs], [r for _, r in runs]
    result = {
        "command": "python benchmarks/demo_resources.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_seconds": [round(w, 1) for w in walls],
        "peak_rss_mib": [round(r, 1) for r in rss],
        "median_wall_seconds": round(sorted(walls)[len(walls) // 2], 1),
        "max_peak_rss_mib": round(max(rss), 1),
        "under_4_gib": max(rss) < 4096,
    }
    print(result)
    update_results("demo_resources" if args.recipe is None else f"recipe_resources/{args.recipe.stem}", result)


if __name__ == "__main__":
    main()
