"""`mopd sweep --executor ray` and `mopd compare --seeds N --executor ray`: the variants of one invocation (sweep
points, seeds) as Ray tasks, as many at once as the cluster's CPUs and GPUs allow.

Why a task per variant, not Ray Tune: a variant is a whole recipe run with its own run directory, resume and
stage identities; Tune's trials, checkpoints and result directories would duplicate each of them. The task runs
the same `run` function the local executor calls, in a worker. Why some variants wait: a variant that shares a
stage identity with an earlier variant (a sweep point's parents, trained by its seed's first point; a stage that
pins its own `seed:`) starts once the run.json of that variant records the shared stages done (or the variant
finished; `variants.variant_waits`), so the shared stage is trained once and linked, as when the points run one
after another, while the first point's own student still trains; the others start at once. A worker that dies
is retried by Ray and the retry resumes from the variant's checkpoints; a variant that fails releases its waiters
(they train what it did not finish) and the others run on.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..core.errors import StageError
from ..execution.ray_executor import (
    WORKER_RETRIES,
    check_resources,
    import_ray,
    plugins_by_value,
    ray_cluster,
)
from ..execution.run_lock import RAY_WRITER_WAIT_S, run_lock
from ..execution.stage_failures import first_line
from ..recipe.load import LoadedRecipe
from .variants import Executor, RunFn, Variant, VariantRuns

POLL_SECONDS = 0.25  # how often waiting variants look for the shared stages they need


def variant_resources(loaded: LoadedRecipe) -> tuple[float, float]:
    """(CPUs, GPUs) a variant's task asks for: its stages run one after another in it, so the most any stage
    declares in `resources`."""
    stages = loaded.recipe.stages.values()
    return max(s.resources.cpus for s in stages), max(s.resources.gpus for s in stages)


def variant_label(v: Variant) -> str:
    """A variant as its directories under the invocation's run directory name it: `<point>[/seed-<s>]`."""
    seed = v.out.name if v.out.name.startswith("seed-") else ""
    return "/".join(p for p in (v.name, seed) if p) or v.out.name


def ray_executor(console: Console, address: str | None = None, threads: int | None = None) -> Executor:
    """An executor for `experiments.variants.run_variants`: each variant a Ray task on the cluster at `address` (None:
    a local instance) with `threads` torch threads (default: its CPUs). The extra, the address and every
    variant's resources are checked before any variant starts, each mistake one StageError line."""

    def execute(runs: VariantRuns) -> list[Any]:
        ray = import_ray()
        with ray_cluster(runs.variants[0].loaded, address):
            for v in runs.variants[1:]:
                check_resources(v.loaded, ray.cluster_resources())
            return _run_tasks(ray, runs, console, threads)

    return execute


def _run_tasks(ray: Any, runs: VariantRuns, console: Console, threads: int | None) -> list[Any]:
    plugins_by_value(ray)
    task = ray.remote(_variant_task)
    results: list[Any] = [None] * len(runs.variants)
    waiting, running, done = list(range(len(runs.variants))), {}, set()
    started: dict[int, float] = {}
    failed: list[str] = []
    while waiting or running:
        recorded = runs.finished() if any(not runs.waits[i] <= done for i in waiting) else set()
        for i in [i for i in waiting if runs.waits[i] <= done or runs.needs[i] <= recorded]:
            v = runs.variants[i]
            runs.prepare(v)
            cpus, gpus = variant_resources(v.loaded)
            loaded = dataclasses.replace(v.loaded, path=v.loaded.path.resolve())  # workers run elsewhere
            ref = task.options(num_cpus=cpus, num_gpus=gpus, max_retries=WORKER_RETRIES,
                               name=f"mopd:{variant_label(v)}").remote(
                runs.run, loaded, Path(v.out).resolve(), threads or max(1, int(cpus)))
            running[ref], started[i] = i, time.time()
            waiting.remove(i)
            console.print(f"{variant_label(v)}: started on Ray ({cpus:g} CPU, {gpus:g} GPU)", highlight=False,
                          markup=False)
        # while variants wait for shared stages, look for them every POLL_SECONDS
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS if waiting else None)
        for ref in ready:
            i = running.pop(ref)
            done.add(i)
            label = variant_label(runs.variants[i])
            try:
                results[i] = ray.get(ref)
            except Exception as e:  # not a stage's failure (those are `run`'s result): the variant's own
                failed.append(f"{label}: {first_line(getattr(e, 'cause', None) or e)}")
                console.print(f"[bold red]{escape(label)}: failed:[/] {escape(failed[-1])}", highlight=False,
                              soft_wrap=True)
                continue
            console.print(f"{label}: finished ({time.time() - started[i]:.0f}s)", highlight=False, markup=False)
    if failed:
        raise StageError("\n".join(failed))
    return results


def _variant_task(run: RunFn, loaded: LoadedRecipe, out: Path, threads: int) -> Any:
    """In a Ray worker: one variant's recipe run with `threads` torch threads."""
    import torch

    from ..runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    with run_lock(Path(out), wait_s=RAY_WRITER_WAIT_S):
        pass  # a task of a killed sweep may still hold this run directory for seconds (`run_lock`): let it end
    return run(loaded, out)

