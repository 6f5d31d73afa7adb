"""The main-job figures of docs/BENCHMARKS.md, measured end to end through the CLI.

    .venv/bin/python benchmarks/demo_figures.py [--out DIR] [--skip-repeat] [--skip-kill]

1. `mopd demo` wall time on this machine, each teacher's gain over the SFT start, the normalized score.
2. The same recipe and seed run again into a fresh directory: are the eval metrics identical?
3. kill -9 during the MOPD stage, then the same command again: were finished stages skipped, did the MOPD stage
   resume, is the report valid?
Writes benchmarks/demo_figures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOPD = [sys.executable, "-m", "mopd"]


def demo(out: Path) -> float:
    t0 = time.time()
    subprocess.run([*MOPD, "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0


def final_evals(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    return {s: json.loads((out / s / "final" / "mopd.json").read_text())["metrics"]["eval"] for s in run["order"]}


def kill_during_mopd(out: Path) -> dict:
    proc = subprocess.Popen([*MOPD, "demo", "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = out / "student" / "checkpoints"
    while not any(ckpts.glob("step-*")):
        if proc.poll() is not None:
            raise SystemExit("the demo ended before the MOPD stage wrote a checkpoint")
        time.sleep(0.2)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    t0 = time.time()
    subprocess.run([*MOPD, "demo", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    rerun = time.time() - t0
    run = json.loads((out / "run.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    return {
        "killed_after_checkpoint_step": killed_at,
        "rerun_seconds": round(rerun, 1),
        "status_after_rerun": {s: v["status"] for s, v in run["stages"].items()},
        "report_written": (out / "report.md").exists() and summary["normalized_score"] is not None,
        "normalized_score_after_resume": summary["normalized_score"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--skip-repeat", action="store_true")
    ap.add_argument("--skip-kill", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"}

    wall = demo(args.out / "a")
    summary = json.loads((args.out / "a" / "summary.json").read_text())
    result["demo"] = {
        "wall_seconds": round(wall, 1),
        "normalized_score": summary["normalized_score"],
        "domains": summary["domains"],
        "every_teacher_beats_start": all(d["teacher"] > d["start"] for d in summary["domains"].values()),
    }
    print(json.dumps(result["demo"], indent=2), flush=True)
    if not args.skip_repeat:
        demo(args.out / "b")
        result["repeat_identical_eval_metrics"] = final_evals(args.out / "a") == final_evals(args.out / "b")
        print("identical:", result["repeat_identical_eval_metrics"], flush=True)
    if not args.skip_kill:
        result["kill_9_resume"] = kill_during_mopd(args.out / "k")
        print(json.dumps(result["kill_9_resume"], indent=2), flush=True)
    (ROOT / "benchmarks" / "demo_figures.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
