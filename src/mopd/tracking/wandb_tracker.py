"""Weights & Biases: one W&B run per mopd run, resumed by the id kept in the run directory.

Offline (`mode: offline` or WANDB_MODE=offline) writes under RUN/tracking/wandb with no network; `wandb sync`
uploads it later. The console is not captured: mopd's progress display is not a log.
"""

from __future__ import annotations

from ..core.schema import WandbSettings
from .base import TrackerRun


class WandbTracker:
    def __init__(self, settings: WandbSettings, run: TrackerRun):
        import wandb

        run.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.project or run.project, entity=settings.entity, id=run.run_id, name=run.run_name,
            resume="allow", dir=str(run.directory), config=run.config, mode=settings.mode,
            tags=settings.tags or None, settings=wandb.Settings(console="off"),
        )
        self.step = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)
        self.step = max(self.step, step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        # W&B drops a step below its latest: the table goes in at the latest, its rows say their own step
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=max(self.step, step))

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
