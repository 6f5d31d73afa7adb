"""The data-parallel learner's worker group under `--executor ray` (`learner: {workers: W}`): the stage's own Ray
task is rank 0 and starts W - 1 Ray tasks as the other ranks; all W join one torch.distributed group (gloo on
CPU, NCCL on GPU) and run the same stage, each with its rank's learner strategy (`learner.strategy`: DDP or FSDP).

Why a group of plain Ray tasks rather than Ray Train's TorchTrainer: a mopd step is not a self-contained
training function. Rank 0 samples (itself or through rollout workers), scores with the teachers, writes the
stage's metrics and checkpoints through the same driver loop as every other stage, and must resume from the
stage's checkpoint when Ray retries it; TorchTrainer owns the training loop, its checkpoints and its storage,
and would need the stage loop split around it. A worker group that runs the unchanged stage on every rank (as
verl's actor worker groups do) keeps one code path, and needs only `ray` (not `ray[train]`).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from ..core.errors import StageError
from ..learner.strategy import data_parallel
from ..recipe.load import LoadedRecipe
from ..stages.resolved import ResolvedStage
from ..stages.run import run_stage
from .resolve import resolve_stage

GROUP_TIMEOUT = timedelta(minutes=30)  # a rank that waits this long for the others in a collective fails


def learner_workers(loaded: LoadedRecipe, name: str) -> int:
    spec = getattr(loaded.recipe.stages[name], "learner", None)
    return 1 if spec is None else spec.workers


def check_local(loaded: LoadedRecipe) -> None:
    """A data-parallel learner needs the Ray executor (its ranks are Ray tasks): one line before compute."""
    for name in loaded.order:
        if learner_workers(loaded, name) > 1:
            raise StageError(f"stage {name!r}: `learner: {{workers: {learner_workers(loaded, name)}}}` runs its "
                             "ranks as Ray tasks: run with `--executor ray` (or remove `learner:`)")


def group_runner(loaded: LoadedRecipe, name: str, out: Path, ids: dict[str, str],
                 threads: int) -> Callable[[ResolvedStage], Path]:
    """`run` for `stage_step.run_stage_step` in the stage's Ray task: the stage itself with one learner worker,
    else rank 0 of a group whose other ranks it starts here."""
    world = learner_workers(loaded, name)

    def run(ctx: ResolvedStage) -> Path:
        if world == 1:
            return run_stage(ctx)
        import ray

        host = ray.util.get_node_ip_address()  # the node's address Ray reports (127.0.0.1 for mopd's own instance)
        init = f"tcp://{host}:{_free_port(host)}"
        res = loaded.recipe.stages[name].resources
        rank_task = ray.remote(_rank).options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0,
                                              name=f"mopd:{name}:rank")
        others = [rank_task.remote(loaded, name, out, ids, rank, world, init, threads) for rank in range(1, world)]
        with _group(ctx, 0, world, init) as ranked:
            final = run_stage(ranked)
        ray.get(others)
        return final

    return run


def _rank(loaded: LoadedRecipe, name: str, out: Path, ids: dict[str, str], rank: int, world: int, init: str,
          threads: int) -> None:
    """In a Ray task: rank `rank` of the stage's learner group (no logging, no checkpoints: rank 0 writes)."""
    import torch

    torch.set_num_threads(threads)
    ctx = resolve_stage(loaded, name, Path(out), ids, executor="ray")
    with _group(ctx, rank, world, init) as ranked:
        run_stage(ranked)


@contextmanager
def _group(ctx: ResolvedStage, rank: int, world: int, init: str) -> Iterator[ResolvedStage]:
    """Join the group as `rank` (gloo on CPU, NCCL on a GPU); yields the stage as this rank runs it (its learner:
    the rank's strategy of `learner.strategy`, `ctx` itself unchanged); leave the group."""
    import torch.distributed as dist

    backend = "nccl" if ctx.placement.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)
    spec = ctx.learner_workers
    try:
        yield dataclasses.replace(ctx, learner=data_parallel("ddp" if spec is None else spec.strategy, rank, world))
    finally:
        dist.destroy_process_group()


def _free_port(host: str) -> int:
    """A port free on `host`, the address the group's rendezvous listens on (not every interface)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
