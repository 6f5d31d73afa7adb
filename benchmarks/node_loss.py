"""Node-loss trials on a simulated 3-node Ray cluster (issue 36): how many runs that lost a node end with the
numbers of an uninterrupted run, and how long each loss took to recover from.

    .venv/bin/python benchmarks/node_loss.py [--trials 5] [--tag NAME]

Runs `tests/node_loss_cluster.py` (which says what a trial does) with `--trials N` in a process of its own, one
cluster for all trials: per trial, a stage's node removed after its first checkpoint, then the node holding a MOPD
student's teacher actor and the one holding its rollout worker. Writes benchmarks/results.json key "node_loss"
(or "node_loss/<--tag>").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common
from trl_vs_mopd import update_results

ROOT = Path(__file__).resolve().parents[1]


def _spread(xs: list[float | None]) -> dict[str, float] | None:
    """Median, min and max of the recovery times measured (a trial whose node was not removed has none)."""
    found = [x for x in xs if x is not None]
    return {"median": round(statistics.median(found), 1), "min": min(found), "max": max(found)} if found else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--tag", default=None, help="results.json sub-key")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "tests.node_loss_cluster", tmp, "--trials", str(args.trials)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        trials = json.loads((Path(tmp) / "result.json").read_text())
    stage, actors = trials["stage"], trials["actors"]
    result = {
        "machine": _common.machine(), "load_average_at_end": os.getloadavg(),
        "command": f"benchmarks/node_loss.py --trials {args.trials}",
        "cluster": "ray.cluster_utils.Cluster on 127.0.0.1: a head with no CPU and 3 nodes of 1 CPU",
        "cluster_start_s": trials["cluster_start_s"],
        "stage_node": {
            "identical": f"{sum(t['removed'] and t['resumed_from_checkpoint'] and t['identical'] for t in stage)} "
                         f"of {len(stage)}",
            "recover_s": _spread([t["recover_s"] for t in stage]),
        },
        "teacher_actor_and_rollout_worker_nodes": {
            "identical": f"{sum(len(t['removed']) == 2 and t['restarted'] and t['identical'] for t in actors)} "
                         f"of {len(actors)}",
            **{f"{kind}_recover_s": _spread([t["recover_s"].get(kind) for t in actors])
               for kind in ("TeacherWorker", "RolloutWorker")},
        },
        "trials": trials,
    }
    print(json.dumps(result, indent=2))
    update_results("node_loss" + (f"/{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
