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
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from ..core.errors import StageError
from .load import LoadedRecipe
from .progress import PlainProgress
from .refs import stage_refs
from .stage_step import run_stage_step

RAY_EXTRA = "pip install 'mopd[ray]'"
WORKER_RETRIES = 2  # a worker process that dies (killed, out of memory) is restarted this many times
CONNECT_TIMEOUT_S = 5.0  # an --address that does not answer within this fails before compute


def import_ray() -> Any:
    """The `ray` module, or one StageError line naming the extra."""
    try:
        import ray
    except ImportError:
        raise StageError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


@contextmanager
def ray_cluster(loaded: LoadedRecipe, address: str | None) -> Iterator[None]:
    """Connect to the Ray cluster at `address` (None: start a local instance; "auto": the one this machine
    belongs to) unless this process already did, and check every stage's resources fit it: each mistake is one
    StageError line before compute. Shuts down what it started."""
    ray = import_ray()
    if address and address != "auto":
        _check_reachable(address)
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        except Exception as e:  # ConnectionError, a version mismatch, no cluster for "auto"
            raise StageError(f"--address {address}: cannot start or join Ray ({_first_line(e)})") from None
        started = True
    try:
        _check_resources(loaded, ray.cluster_resources())
        yield
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A plain TCP connect to the address's host and port, bounded by CONNECT_TIMEOUT_S (ray.init itself keeps
    retrying an unreachable head for a minute or more)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise StageError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise StageError(f"--address {address}: no Ray head answers there within {CONNECT_TIMEOUT_S:.0f}s "
                         f"({e.strerror or e}); start one with `ray start --head`") from None


def _check_resources(loaded: LoadedRecipe, cluster: dict[str, float]) -> None:
    """A stage that asks for more CPUs or GPUs than the whole cluster has would wait forever: one line."""
    for name in loaded.order:
        res = loaded.recipe.stages[name].resources
        for key, asked in (("CPU", res.cpus), ("GPU", res.gpus)):
            have = cluster.get(key, 0.0)
            if asked > have:
                raise StageError(f"stage {name!r}: resources ask for {asked:g} {key}s; the Ray cluster has "
                                 f"{have:g}: lower `resources` or add nodes")


def run_on_ray(loaded: LoadedRecipe, out: Path, ids: dict[str, str], stages_info: dict[str, dict],
               record: Callable[[str, dict], None], console: Console, *, threads: int | None = None) -> None:
    """Submit every stage whose parents finished, as they finish; `record(name, entry)` each finished stage.

    A failed stage stops its dependants; the others run on. At the end, one StageError line per failed stage."""
    ray = import_ray()
    recipe = loaded.recipe
    # workers run in other directories: every path they read absolute
    loaded = dataclasses.replace(loaded, path=loaded.path.resolve())
    out = Path(out).resolve()
    _plugins_by_value(ray)
    shared = ray.put(loaded)
    task = ray.remote(_stage_task)
    parents = {n: [r for _, r in stage_refs(recipe.stages[n]) if r in recipe.stages] for n in loaded.order}
    waiting, running = list(loaded.order), {}
    done: set[str] = set()
    failed: dict[str, str] = {}  # stage -> its error, one line
    stopped: dict[str, str] = {}  # stage -> the failed stage it depends on
    while waiting or running:
        for name in list(waiting):
            cause = next((failed.get(p) and p or stopped.get(p) for p in parents[name]
                          if p in failed or p in stopped), None)
            if cause is not None:
                stopped[name] = cause
                waiting.remove(name)
            elif all(p in done for p in parents[name]):
                res = recipe.stages[name].resources
                ref = task.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=WORKER_RETRIES,
                                   name=f"mopd:{name}").remote(
                    shared, name, out, ids, stages_info.get(name, {}), threads or max(1, int(res.cpus)))
                running[ref] = name
                waiting.remove(name)
                console.print(f"{name}: started on Ray ({res.cpus:g} CPU, {res.gpus:g} GPU)", highlight=False)
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            name = running.pop(ref)
            try:
                info = ray.get(ref)
            except Exception as e:
                failed[name] = _first_line(getattr(e, "cause", None) or e)
                console.print(f"[bold red]{name}: failed:[/] {failed[name]}", highlight=False, soft_wrap=True)
                continue
            done.add(name)
            record(name, info)
            console.print(f"{name}: {info['status']} ({info.get('wall_seconds', 0):.1f}s)", highlight=False)
    if failed:
        raise StageError("\n".join(_failure_line(n, why, [s for s, c in stopped.items() if c == n])
                                   for n, why in failed.items()))


def _plugins_by_value(ray: Any) -> None:
    """Domain plugins are modules loaded from files (`envs.load_plugin`), which a worker cannot import by name:
    send their code with the recipe instead."""
    for name, module in list(sys.modules.items()):
        if name.startswith("mopd_plugin_"):
            ray.cloudpickle.register_pickle_by_value(module)


def _failure_line(name: str, why: str, dependants: list[str]) -> str:
    not_run = f"; not run: {', '.join(dependants)}" if dependants else ""
    return f"stage {name!r} failed: {why}{not_run}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, StageError):
        return text.splitlines()[0] if text else type(e).__name__
    line = next((s for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _stage_task(loaded: LoadedRecipe, name: str, out: Path, ids: dict[str, str], prior: dict,
                threads: int) -> dict:
    """In a Ray worker: one stage through `run_stage_step`, `threads` torch threads, progress as plain lines."""
    import torch

    from ..runtime import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(threads)
    console = Console(file=sys.stdout, force_terminal=False, force_jupyter=False, width=160)
    progress = PlainProgress(console)
    bar = progress.add_task(name, total=getattr(loaded.recipe.stages[name], "steps", 1), info="")

    def on_progress(step: int, total: int, metrics: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k in ("loss", "reward/mean"))
        progress.update(bar, completed=step, info=shown)

    def warn(msg: str) -> None:
        console.print(f"warning: {msg}", highlight=False, markup=False, soft_wrap=True)

    return run_stage_step(loaded, name, out, ids, prior, warn=warn, on_progress=on_progress)
