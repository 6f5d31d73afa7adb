"""TensorBoard: event files under RUN/tracking/tensorboard/<run name>, written with torch's SummaryWriter.

Why `purge_step`: the writer opens at the first step this process logs; a run resumed after a kill tells
TensorBoard to drop whatever an earlier process wrote from that step on, so no step appears twice.
"""

from __future__ import annotations

import json

from .base import TrackerRun


class TensorBoardTracker:
    def __init__(self, run: TrackerRun):
        self.logdir = run.directory / "tensorboard" / run.run_name
        self.config = run.config
        self.writer = None

    def _writer(self, step: int):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.logdir), purge_step=step)
            text = json.dumps(self.config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("config", f"```\n{text}\n```", global_step=step)
        return self.writer

    def log(self, metrics: dict[str, float], step: int) -> None:
        writer = self._writer(step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=step)
        writer.flush()  # a kill loses nothing that metrics.jsonl already has

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """TensorBoard's text plugin renders markdown: the table as one, each cell on one line."""
        def cell(x) -> str:
            return str(x).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
        writer = self._writer(step)
        writer.add_text(key, "\n".join(lines), global_step=step)
        writer.flush()

    def summary(self, values: dict[str, float], step: int) -> None:
        self.log({f"summary/{k}": v for k, v in values.items()}, step)

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
