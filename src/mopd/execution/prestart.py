"""Prestarted stage workers under `--executor ray`: the workers a recipe's stages will run on, started and warmed
when the executor starts, then reused by every stage.

Why: Ray starts its worker processes bare, and the first stage a worker runs imports torch, transformers and
mopd's stage runners (4-7 s on the project's 2-core machine). Ray starts a worker when a task finds none idle,
so two short stages meant to run side by side did not: the second waited for its worker to import while the
first finished (issue 36: the second teacher started 8-9 s late, and the miniature recipe took 2x its local time
under Ray). So the executor submits, as it starts, one warm-up task for each stage task the recipe can run at one
moment, each reserving that stage's CPUs so that they run at the same time on workers of their own; each imports
what a stage imports. A task's worker goes back to Ray's pool when the task ends, and the stages then take these
warm workers instead of starting cold ones. The first stage waits for a warm-up to end (they hold the CPUs), which
costs it nothing where the cores are free: it would have imported the same modules itself.

Not warmed: stages that reserve a GPU. Their warm-ups would hold the GPUs while they import (seconds, against a
GPU stage's minutes), and a worker that ran on one GPU should not serve a stage given another: its CUDA context
stays with the process (why Ray gives a function declared with GPUs a fresh worker per call, ray-project/ray#29624).
Nor actors (teacher actors, rollout workers): Ray starts a process of their own for each, never a task's worker.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ..recipe.load import LoadedRecipe
from .learner_group import learner_workers

# what a stage's Ray task imports before its first step: its own module and every stage runner
STAGE_MODULES = ("mopd.execution.ray_executor", "mopd.stages.run")


def widest_moment(loaded: LoadedRecipe, cluster_cpus: float) -> list[float]:
    """The CPUs of each Ray task (a stage's own, and its learner ranks') of the recipe's widest generation that
    the cluster's CPUs hold at once, fewest CPUs first. A generation is the stages with equally long chains of
    parents before them (the teachers of one start, say): they become ready together, so they run together.
    Stages that reserve a GPU are left out (see the module's docstring)."""
    depth: dict[str, int] = {}
    by_depth: dict[int, list[float]] = {}
    for name in loaded.order:  # parents come first
        depth[name] = 1 + max((depth[p] for p in loaded.facts[name].parents), default=-1)
        res = loaded.recipe.stages[name].resources
        if res.gpus == 0:
            by_depth.setdefault(depth[name], []).extend([res.cpus] * learner_workers(loaded, name))
    widest: list[float] = []
    for cpus in by_depth.values():
        fit: list[float] = []
        for c in sorted(cpus):
            if sum(fit) + c > cluster_cpus:
                break
            fit.append(c)
        widest = max(widest, fit, key=len)
    return widest


def warm_up() -> int:
    """In a Ray worker: import what a stage's task imports; returns the worker's process id."""
    for module in STAGE_MODULES:
        importlib.import_module(module)
    return os.getpid()


def prestart_workers(ray: Any, loaded: LoadedRecipe) -> list[Any]:
    """Submit one warm-up task per task of the recipe's widest moment (`widest_moment`), each with that task's
    CPUs; returns their object references without waiting (stages submitted next queue behind them and then run
    on the workers they warmed)."""
    task = ray.remote(warm_up)
    return [task.options(num_cpus=cpus, max_retries=0, name="mopd:prestart").remote()
            for cpus in widest_moment(loaded, ray.cluster_resources().get("CPU", 0.0))]
