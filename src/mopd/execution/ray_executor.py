"""The Ray executor of `mopd run --executor ray`: every stage whose parents finished runs as a Ray task with the
CPUs / GPUs its `resources` declare, so independent stages (a recipe's teacher pipelines) run at the same time.

Why a task per stage, calling the same `stage_step.run_stage_step` the local executor calls: identity, skipping
of finished stages, archiving of stale ones and resume from the newest verified checkpoint stay one code path.
A worker that dies is retried by Ray (`WORKER_RETRIES`) and the retry resumes from the stage's checkpoint; a stage
that raises stops its dependants only. Callbacks cannot cross into a worker, so a worker prints plain progress
lines (Ray forwards its stdout) and the driver replays each finished stage's metrics.jsonl to the trackers.

The driver keeps the run directory's lock for the whole run and writes run.json; the workers write the stage
directories, so the run directory must be on a filesystem every Ray node sees (one machine, or a shared mount).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..core.errors import StageError
from ..core.extras import import_problem
from ..core.run_dir import METRICS
from ..recipe.load import LoadedRecipe
from ..runtime import start_local_ray
from ..stages.resolved import StageHooks
from .learner_group import group_runner, learner_workers
from .progress import logged_step, progress_info, stage_progress
from .ray_address import check_address
from .run_lock import stage_lock
from .scheduler import Ended
from .stage_failures import first_line
from .stage_step import run_stage_step

RAY_EXTRA = "pip install 'mopd[ray]'"
WORKER_RETRIES = 2  # a worker process that dies (killed, out of memory) is restarted this many times
PROGRESS_POLL_SECONDS = 1.0  # how often the driver reads the running stages' metrics logs for their progress


def import_ray() -> Any:
    """The `ray` module, or one StageError line naming the extra."""
    if why := import_problem("ray"):
        raise StageError(f"--executor ray needs Ray, which does not import here ({why}): {RAY_EXTRA}")
    import ray

    return ray


@contextmanager
def ray_cluster(loaded: LoadedRecipe, address: str | None) -> Iterator[None]:
    """Connect to the Ray cluster at `address` (None: start a local instance; "auto": the one this machine
    belongs to) unless this process already did, and check every stage's resources fit it: each mistake is one
    StageError line before compute. Shuts down what it started."""
    ray = import_ray()
    if address is not None:
        check_address(ray, address)  # bounded: ray.init retries a port that is not a Ray head for minutes
    started = False
    if not ray.is_initialized():
        # concurrent stages and sweep points print look-alike progress lines; Ray would fold them into one
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        try:
            if address is None:  # a local instance: on the loopback address only
                start_local_ray(ray, log_to_driver=True)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except Exception as e:  # ConnectionError, a version mismatch, no cluster for "auto"
            raise StageError(f"--address {address}: cannot start or join Ray ({first_line(e)})") from None
        started = True
    try:
        check_resources(loaded, ray.cluster_resources())
        yield
    finally:
        if started:
            ray.shutdown()


def check_resources(loaded: LoadedRecipe, cluster: dict[str, float]) -> None:
    """A stage that asks for more CPUs or GPUs than the whole cluster has would wait forever: one line."""
    for name in loaded.order:
        stage = loaded.recipe.stages[name]
        res, rollout, ranks = stage.resources, getattr(stage, "rollout", None), learner_workers(loaded, name)
        workers = (0, 0.0, 0.0) if rollout is None else (rollout.workers, rollout.cpus, rollout.gpus)
        # the stage's task and its other learner ranks, each with `resources`, and its rollout workers
        for key, asked in (("CPU", ranks * res.cpus + workers[0] * workers[1]),
                           ("GPU", ranks * res.gpus + workers[0] * workers[2])):
            have = cluster.get(key, 0.0)
            if asked > have:
                together = " (its learner ranks and rollout workers together)" if ranks > 1 or rollout else ""
                raise StageError(f"stage {name!r}: resources ask for {asked:g} {key}s{together}; the Ray cluster "
                                 f"has {have:g}: lower `resources` or add nodes")


class RayExecutor:
    """Each submitted stage a Ray task with the CPUs / GPUs its `resources` declare (`threads` torch threads, by
    default its `resources.cpus`); `wait_any` polls the running stages' metrics logs for their progress bars
    while it waits."""

    def __init__(self, loaded: LoadedRecipe, out: Path, ids: dict[str, str], console: Console,
                 threads: int | None = None) -> None:
        self.ray = import_ray()
        # workers run in other directories: every path they read absolute
        self.loaded = dataclasses.replace(loaded, path=loaded.path.resolve())
        self.out, self.ids, self.console, self.threads = Path(out).resolve(), ids, console, threads
        self.running: dict[Any, str] = {}  # task ref -> stage
        self.bars: dict[str, Any] = {}  # stage -> its progress bar (or plain lines), one per started stage

    def __enter__(self) -> RayExecutor:
        plugins_by_value(self.ray)
        self.shared = self.ray.put(self.loaded)
        self.task = self.ray.remote(_stage_task)
        self.progress = stage_progress(self.console).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def _steps(self, name: str) -> int:
        return getattr(self.loaded.recipe.stages[name], "steps", 1)

    def submit(self, name: str, prior: dict) -> None:
        res = self.loaded.recipe.stages[name].resources
        ref = self.task.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=WORKER_RETRIES,
                                name=f"mopd:{name}").remote(
            self.shared, name, self.out, self.ids, prior, self.threads or max(1, int(res.cpus)))
        self.running[ref] = name
        self.progress.console.print(f"{name}: started on Ray ({res.cpus:g} CPU, {res.gpus:g} GPU)", highlight=False,
                                    markup=False)
        self.bars[name] = self.progress.add_task(name, total=self._steps(name), info="")

    def wait_any(self) -> list[Ended]:
        ended: list[Ended] = []
        while not ended:
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=PROGRESS_POLL_SECONDS)
            for name in self.running.values():
                if (logged := logged_step(self.out / name / METRICS)) is not None:
                    self.progress.update(self.bars[name], completed=logged[0], info=progress_info(logged[1]))
            for ref in ready:
                name = self.running.pop(ref)
                try:
                    info = self.ray.get(ref)
                except Exception as e:
                    ended.append(Ended(name, error=e))
                    continue
                self.progress.update(self.bars[name], completed=self._steps(name),
                                     info=f"{info['status']} ({info.get('wall_seconds', 0):.1f}s)")
                ended.append(Ended(name, entry=info))
        return ended

    def failed(self, name: str, why: str) -> None:
        self.progress.console.print(f"[bold red]{name}: failed:[/] {escape(why)}", highlight=False, soft_wrap=True)


def plugins_by_value(ray: Any) -> None:
    """Domain plugins are modules loaded from files (`envs.load_plugin`), which a worker cannot import by name:
    send their code with the recipe instead."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mopd_plugin_"):
            ray.cloudpickle.register_pickle_by_value(module)


def _stage_task(loaded: LoadedRecipe, name: str, out: Path, ids: dict[str, str], prior: dict,
                threads: int) -> dict:
    """In a Ray worker: one stage through `run_stage_step` with `threads` torch threads; warnings as plain lines
    (Ray forwards them), progress through the stage's metrics log (the driver shows it)."""
    import torch

    from ..runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    console = Console(file=sys.stdout, force_terminal=False, force_jupyter=False, width=160)

    def warn(msg: str) -> None:
        console.print(f"warning: {msg}", highlight=False, markup=False, soft_wrap=True)

    def note(msg: str) -> None:
        console.print(f"{name}: {msg}", highlight=False, markup=False, soft_wrap=True)

    with stage_lock(Path(out), name):  # an orphaned worker of a killed run may still be writing it
        return run_stage_step(loaded, name, out, ids, prior, hooks=StageHooks(warn=warn, note=note), executor="ray",
                              run=group_runner(loaded, name, out, ids, threads))
