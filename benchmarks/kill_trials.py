"""Random kill -9 trials: a run killed at random moments (one to three times) and then run to the end must hold
exactly what an uninterrupted run holds.

Each trial starts `mopd run` on the miniature recipe of the test suite (every stage kind that trains, resumable
checkpoints every step or two), sends SIGKILL to its process group at a random moment, possibly again during the
next attempt, then runs the same command to completion. It then compares, stage by stage, the bytes of every
final checkpoint file (weights, config, tokenizer, eval scores and the lineage without its timings), every
metrics row without its wall-clock time, and the summary without its wall time, against an uninterrupted run.
`--threads 1` in every process, so the arithmetic is the same in all of them.

    .venv/bin/python benchmarks/kill_trials.py --trials 20 --seed 0 --json benchmarks/kill_trials.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import MINI_RECIPE  # noqa: E402

TIMING_KEYS = {"time", "elapsed_seconds", "wall_seconds"}


def _recipe(path: Path) -> Path:
    data = yaml.safe_load(MINI_RECIPE)
    for stage in data["stages"].values():
        stage["checkpoint_every"] = 1 if stage.get("steps", 1) <= 4 else 2
    data["stages"]["student"]["steps"] = 8
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mopd", "run", str(recipe), "--out", str(out), "--threads", "1"]


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def fingerprint(out: Path) -> dict[str, str]:
    """What must not depend on kills: file digests of every final checkpoint (the lineage without timings and
    without its checksum fields, which cover the timings; paths in it and in the model card with the run
    directory as <RUN>), metrics rows and the summary without timings."""
    found: dict[str, str] = {}
    for stage in sorted(p for p in out.iterdir() if (p / "final").is_dir()):
        for f in sorted((stage / "final").rglob("*")):
            if not f.is_file():
                continue
            key = f"{stage.name}/final/{f.relative_to(stage / 'final').as_posix()}"
            if f.name == "mopd.json":
                # paths inside the run directory differ between runs only by the directory's own name
                lineage = _strip(json.loads(f.read_text().replace(str(out), "<RUN>")))
                for bookkeeping in ("checksum", "files", "metrics_log"):  # checksums of files that hold times
                    lineage.pop(bookkeeping, None)
                data = json.dumps(lineage, sort_keys=True).encode()
            elif f.suffix in (".md", ".json"):  # the model card and HF configs may name the run directory
                data = f.read_text().replace(str(out), "<RUN>").encode()
            else:
                data = f.read_bytes()
            found[key] = hashlib.sha256(data).hexdigest()
        rows = [_strip(json.loads(x)) for x in (stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        found[f"{stage.name}/metrics.jsonl"] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    summary = _strip(json.loads((out / "summary.json").read_text()))
    found["summary.json"] = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return found


def _killed_attempt(cmd: list[str], after: float) -> bool:
    """Start `cmd`, SIGKILL its process group after `after` seconds; False if it finished before that."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="mopd-kill-"))
    recipe = _recipe(work / "mini.yaml")
    t0 = time.time()
    subprocess.run(_command(recipe, work / "reference"), check=True, stdout=subprocess.DEVNULL)
    full = time.time() - t0
    reference = fingerprint(work / "reference")
    results = []
    for trial in range(args.trials):
        out = work / f"trial-{trial}"
        kills = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            at = round(rng.uniform(0.3, 0.9 * full), 2)  # inside the run, if it goes no faster than the reference
            if not _killed_attempt(_command(recipe, out), at):
                break
            kills.append(at)
        subprocess.run(_command(recipe, out), check=True, stdout=subprocess.DEVNULL, timeout=600)
        got = fingerprint(out)
        differ = sorted(k for k in reference.keys() | got.keys() if reference.get(k) != got.get(k))
        results.append({"trial": trial, "kills_at_seconds": kills, "identical": not differ, "differ": differ})
        print(json.dumps(results[-1]), flush=True)
        if differ:
            print(f"kept for inspection: {out} (reference: {work / 'reference'})", flush=True)
        else:
            shutil.rmtree(out)
    summary = {
        "trials": len(results),
        "identical": sum(r["identical"] for r in results),
        "kills": sum(len(r["kills_at_seconds"]) for r in results),
        "trials_without_a_kill": sum(not r["kills_at_seconds"] for r in results),
        "uninterrupted_seconds": round(full, 1),
        "files_compared": len(reference),
        "results": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["identical"] == summary["trials"]:
        shutil.rmtree(work)
    sys.exit(0 if summary["identical"] == summary["trials"] else 1)


if __name__ == "__main__":
    main()
