"""Node loss on a simulated Ray cluster: 3 worker nodes of one CPU each and a head with none, all on 127.0.0.1
(`ray.cluster_utils.Cluster`), each trial removing a whole node (its raylet, object store and every worker on it)
in the middle of a `--executor ray` run, then adding a fresh node so that the cluster has 3 again.

- `stage`: the node that runs a stage is removed after the stage's first checkpoint: Ray retries the stage's task
  on another node, and it resumes from that checkpoint;
- `actors`: the node that holds the MOPD student's teacher actor is removed, then the node that holds its rollout
  worker: Ray restarts each on a node that is left and retries the call it was serving.

Each run must end with the numbers of an uninterrupted one (the local executor's run of the same recipe, with its
teacher in process: every metrics record without its times, and the final weights). Recovery is timed from the
node's removal: for a stage, to its retried attempt resuming (`started_at` in run.json); for an actor, to the
student's next metrics record.

A driver joins one Ray cluster per process and the test session shares a local instance, so this runs in a process
of its own: `python -m tests.node_loss_cluster OUT [--trials N]` writes OUT/result.json (the benchmark
`benchmarks/node_loss.py` runs it with more trials; `tests/test_node_loss.py` with one).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

# the nodes Ray starts here bind 127.0.0.1 (see `mopd.runtime.start_local_ray`); set before ray is imported
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mopd.execution.progress import logged_step  # noqa: E402
from mopd.execution.runner import run_recipe  # noqa: E402
from mopd.recipe.load import load_recipe  # noqa: E402
from mopd.runtime import LOCAL_RAY_NODE_IP  # noqa: E402

NODES = 3
TINY = {"hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32}
STAGE_RECIPE = {
    "name": "node_loss_stage", "seed": 0, "domains": ["addition"], "eval": {"size": 4, "max_new_tokens": 4},
    "stages": {"long": {"kind": "pretrain", "model": TINY, "steps": 60, "batch_size": 4, "checkpoint_every": 5}},
}
ACTORS_RECIPE = {
    "name": "node_loss_actors", "seed": 0, "domains": ["addition"], "eval": {"size": 4, "max_new_tokens": 4},
    "stages": {
        "base": {"kind": "pretrain", "model": TINY, "steps": 4, "batch_size": 8},
        "teacher": {"kind": "sft", "init": "base", "steps": 4, "batch_size": 8},
        # the student's task takes its node's one CPU, so its teacher actor and rollout worker live elsewhere
        "student": {"kind": "mopd", "init": "base", "teachers": {"addition": "teacher"}, "steps": 16,
                    "batch_size": 4, "group_size": 2, "checkpoint_every": 4,
                    "teacher_backends": {"teacher": {"backend": "actor", "resources": {"cpus": 0.5}}},
                    "rollout": {"workers": 1, "cpus": 0.5}},
    },
}


def start_cluster() -> Cluster:
    """The head (no CPU: nothing runs there but the driver) and NODES worker nodes of one CPU, joined."""
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": LOCAL_RAY_NODE_IP})
    for _ in range(NODES):
        add_node(cluster)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def add_node(cluster: Cluster) -> None:
    cluster.add_node(num_cpus=1, node_ip_address=LOCAL_RAY_NODE_IP)


def raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def find_on_nodes(cluster: Cluster, title: str) -> tuple[object, int] | None:
    """The worker node of this cluster and the process on it whose title (Ray's `ray::<task or actor>`) starts
    with `title`. Only this cluster's raylets' children are looked at: the machine may run other Ray instances."""
    for node in cluster.worker_nodes:
        try:
            children = psutil.Process(raylet_pid(node)).children()
        except psutil.NoSuchProcess:
            continue
        for proc in children:
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].startswith(title):
                return node, proc.pid
    return None


def remove_node_of(cluster: Cluster, title: str) -> tuple[float, int]:
    """Remove the worker node running the process titled `title`, then add a fresh one; returns the time of
    the removal and the process id it ended."""
    found = find_on_nodes(cluster, title)
    assert found is not None, f"no process {title!r} on the cluster's nodes"
    cluster.remove_node(found[0])
    removed = time.time()
    add_node(cluster)
    return removed, found[1]


def wait_for(condition: Callable[[], bool], stop: threading.Event, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while not stop.is_set() and time.time() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def records(run: Path, stage: str) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
            for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def same_numbers(run: Path, local: Path, stage: str) -> bool:
    """Every metrics record (times aside) and every final weight of `stage` equal the local run's."""
    a = load_file(local / stage / "final" / "model.safetensors")
    b = load_file(run / stage / "final" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and records(run, stage) == records(
        local, stage)


def local_reference(root: Path, name: str, recipe: dict) -> Path:
    """`recipe` run by the local executor at one torch thread, its teachers in process."""
    plain = json.loads(json.dumps(recipe))
    for stage in plain["stages"].values():
        stage.pop("teacher_backends", None)
    path = root / f"{name}_local.yaml"
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    torch.set_num_threads(1)
    run_recipe(load_recipe(path), root / f"{name}_local")
    return root / f"{name}_local"


def run_with(root: Path, name: str, recipe: dict, killer: Callable[[Path, threading.Event], dict]) -> tuple[
        Path, dict]:
    """`recipe` under the Ray executor into root/<name>, in a thread, while `killer(run dir, ended)` runs here
    (Ray starts a node's processes from the main thread only)."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out, ended, failed = root / name, threading.Event(), []

    def run() -> None:
        try:
            run_recipe(load_recipe(path), out, executor="ray", threads=1)
        except BaseException as e:  # re-raised in the main thread
            failed.append(e)
        finally:
            ended.set()

    thread = threading.Thread(target=run)
    thread.start()
    found = killer(out, ended)
    thread.join()
    if failed:
        raise failed[0]
    return out, found


def stage_trial(cluster: Cluster, root: Path, local: Path) -> dict:
    """Remove the node running the stage once its first checkpoint is saved."""

    def killer(out: Path, stop: threading.Event) -> dict:
        if not wait_for(lambda: any((out / "long" / "checkpoints").glob("step-*")), stop):
            return {}
        removed, pid = remove_node_of(cluster, "ray::mopd:long")
        return {"removed": removed, "pid": pid}

    out, found = run_with(root, "stage", STAGE_RECIPE, killer)
    info = json.loads((out / "run.json").read_text())["stages"]["long"]
    resumed = bool(found) and info["started_at"] > found["removed"] and (
        info["wall_seconds"] > info["ended_at"] - info["started_at"])
    return {"removed": bool(found), "resumed_from_checkpoint": resumed,
            "identical": same_numbers(out, local, "long"),
            "recover_s": round(info["started_at"] - found["removed"], 2) if found else None}


def actors_trial(cluster: Cluster, root: Path, local: Path) -> dict:
    """Remove the node holding the student's teacher actor after its second step, then (once the student logged
    a step after it) the node holding its rollout worker."""

    def killer(out: Path, stop: threading.Event) -> dict:
        metrics = out / "student" / "metrics.jsonl"

        def step() -> int:
            return (logged_step(metrics) or (0, {}))[0]

        found: dict = {}
        for title, after in (("ray::TeacherWorker", 2), ("ray::RolloutWorker", None)):
            at = after if after is not None else step() + 1
            if not wait_for(lambda at=at, title=title: step() >= at and find_on_nodes(cluster, title) is not None,
                            stop):
                return found
            removed, pid = remove_node_of(cluster, title)
            was = step()
            if not wait_for(lambda was=was: step() > was, stop):
                return found
            now = find_on_nodes(cluster, title)
            found[title.removeprefix("ray::")] = {"recover_s": round(time.time() - removed, 2),
                                                  "restarted": now is not None and now[1] != pid}
        return found

    out, found = run_with(root, "actors", ACTORS_RECIPE, killer)
    return {"removed": sorted(found), "restarted": all(v["restarted"] for v in found.values()),
            "identical": same_numbers(out, local, "student"),
            "recover_s": {k: v["recover_s"] for k, v in found.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--trials", type=int, default=1, help="trials of each kind, on one cluster")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    locals_ = {"stage": local_reference(args.out, "stage", STAGE_RECIPE),
               "actors": local_reference(args.out, "actors", ACTORS_RECIPE)}
    started = time.time()
    cluster = start_cluster()
    result: dict = {"cluster_start_s": round(time.time() - started, 2), "stage": [], "actors": []}
    try:
        for i in range(args.trials):
            trial = args.out / f"trial{i}"
            trial.mkdir()
            result["stage"].append(stage_trial(cluster, trial, locals_["stage"]))
            result["actors"].append(actors_trial(cluster, trial, locals_["actors"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
