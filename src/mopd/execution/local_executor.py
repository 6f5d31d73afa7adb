"""The local executor: submitted stages run one at a time in this process, in the recipe's order, each with a
progress bar (or plain lines off a terminal) fed by the stage's own callbacks and metrics records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..core.errors import StageError
from ..recipe.load import LoadedRecipe
from ..stages.resolved import StageHooks
from ..stages.run import run_stage
from .progress import progress_info, stage_progress
from .scheduler import Ended
from .stage_step import run_stage_step


def check_local_gpus(loaded: LoadedRecipe) -> None:
    """GPUs a stage reserves (`resources.gpus`, `rollout.gpus`) that torch does not see here: one line before
    compute. Why: the local executor runs every stage in this process on the device its placement resolves
    (`device: auto` is the CPU without CUDA), so a recipe written for GPUs would otherwise train on the CPU,
    slowly and without a word. On a machine with the GPUs the stage runs on them, as before."""
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name in loaded.order:
        stage = loaded.recipe.stages[name]
        rollout = getattr(stage, "rollout", None)
        for key, asked in (("resources", stage.resources.gpus), ("rollout", rollout.gpus if rollout else 0.0)):
            if asked > have:
                raise StageError(f"stage {name!r}: `{key}: {{gpus: {asked:g}}}`, but torch sees {have} GPU(s) "
                                 "here, and the local executor runs every stage in this process: it would run on "
                                 "the CPU. Run with `--executor ray` on a cluster with the GPUs, or remove the "
                                 f"stage's `{key}.gpus`")


def warn_line(console: Console, msg: str) -> None:
    console.print(f"[bold yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


class LocalExecutor:
    """Queues what the scheduler submits; `wait_any` runs the queued stage that comes first in the recipe's
    order (the order the recipe's stages were always run in) to its end, here."""

    def __init__(self, loaded: LoadedRecipe, out: Path, ids: dict[str, str], console: Console,
                 recorder: Callable[[str], Callable[[dict], None]]) -> None:
        self.loaded, self.out, self.ids, self.console, self.recorder = loaded, out, ids, console, recorder
        self.rank = {n: i for i, n in enumerate(loaded.order)}
        self.queued: dict[str, dict] = {}
        self.bars: dict[str, Any] = {}

    def __enter__(self) -> LocalExecutor:
        self.progress = stage_progress(self.console).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def submit(self, name: str, prior: dict) -> None:
        self.queued[name] = prior

    def wait_any(self) -> list[Ended]:
        name = min(self.queued, key=self.rank.__getitem__)
        prior = self.queued.pop(name)
        total = getattr(self.loaded.recipe.stages[name], "steps", 1)
        task = self.bars[name] = self.progress.add_task(name, total=total, info="")
        try:
            info = run_stage_step(
                self.loaded, name, self.out, self.ids, prior,
                hooks=StageHooks(
                    progress=lambda step, tot, m: self.progress.update(task, completed=step, info=progress_info(m)),
                    warn=lambda msg: warn_line(self.progress.console, msg),
                    record=self.recorder(name),
                    note=lambda msg: self.progress.console.print(f"{name}: {msg}", highlight=False,
                                                                 markup=False, soft_wrap=True)),
                run=run_stage,  # looked up here, so a test can stand in for it
            )
        except Exception as e:  # as on Ray: its dependants are stopped, the rest runs on
            return [Ended(name, error=e)]
        if info["status"] == "cached":
            self.progress.update(task, completed=total, info="[dim]finished earlier (same identity): skipped")
        else:
            self.progress.update(task, completed=total)
        return [Ended(name, entry=info)]

    def failed(self, name: str, why: str) -> None:
        self.progress.update(self.bars[name], info=f"[bold red]failed:[/] {escape(why)}")
