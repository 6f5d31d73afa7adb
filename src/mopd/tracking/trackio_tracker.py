"""trackio: the run goes to trackio's local SQLite store (TRACKIO_DIR, `trackio show` reads it), or to a
Hugging Face Space with `space_id`; a resumed mopd run continues the trackio run of the same name."""

from __future__ import annotations

from ..core.schema import TrackioSettings
from .base import TrackerRun


class TrackioTracker:
    def __init__(self, settings: TrackioSettings, run: TrackerRun):
        import trackio

        self.run = trackio.init(
            project=settings.project or run.project, name=run.run_name, config=run.config, resume="allow",
            space_id=settings.space_id, embed=False,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import trackio

        self.run.log({key: trackio.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        # trackio has no summary of its own: the values go in as metrics at the run's last step
        self.run.log({f"summary/{k}": v for k, v in values.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish()
