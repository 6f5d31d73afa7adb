"""The runner's progress display: rich bars on a terminal, plain progress lines everywhere else.

Why: under CI, `nohup`, a job scheduler or Ray, stdout is a file or a pipe, and rich renders its bars once, at
80 columns, cutting stage names and numbers (`base  ━━━━ 500/… 0:0…`). Off a terminal a log wants lines that
read on their own: the full stage name, step/total, elapsed time and the key metrics, printed every tenth of a
stage or every `interval` seconds (whichever comes first) and when the stage ends.

`stage_progress(console)` returns either one behind the interface the runner uses (a context manager with
`add_task`, `update` and `.console`), so choosing between them is the runner's only change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape, render
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_INTERVAL_SECONDS = 30.0
PLAIN_FRACTION = 0.1  # a line each time a stage crosses another tenth of its steps


def rich_progress(console: Console) -> Progress:
    """The bars a terminal shows: stage, bar, step/total, elapsed, the key metrics."""
    return Progress(
        TextColumn("[bold]{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    )


def format_elapsed(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    started: float
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    last_line: float | None = None  # clock time of the last printed line
    last_bucket: int = 0  # the tenth of the stage the last printed line was in
    done: bool = False


class PlainProgress:
    """Progress as plain lines on `console`, one per stage event worth a line (see the module docstring).

    Takes the calls a `rich.progress.Progress` takes from the runner; `clock` is injectable for tests."""

    def __init__(self, console: Console, interval: float = PLAIN_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.interval = interval
        self.clock = clock
        self._tasks: dict[int, _Task] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = _Task(description, total, self.clock(), float(completed), dict(fields))
        return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        if self._due(task):
            self._print(task)

    def _bucket(self, task: _Task) -> int:
        if not task.total:
            return 0
        return int(task.completed / task.total / PLAIN_FRACTION + 1e-9)

    def _due(self, task: _Task) -> bool:
        """The first update, the end, a new tenth of the stage, or `interval` seconds since the last line."""
        if task.done:
            return False
        if task.total is not None and task.completed >= task.total:
            return True
        if task.last_line is None:
            return True
        return self._bucket(task) > task.last_bucket or self.clock() - task.last_line >= self.interval

    def _print(self, task: _Task) -> None:
        now = self.clock()
        task.last_line, task.last_bucket = now, self._bucket(task)
        task.done = task.total is not None and task.completed >= task.total
        total = "?" if task.total is None else f"{int(task.total)}"
        pct = f" ({100 * task.completed / task.total:.0f}%)" if task.total else ""
        info = render(str(task.fields.get("info", ""))).plain  # markup meant for the bars, as text
        line = f"{task.description}  step {int(task.completed)}/{total}{pct}  {format_elapsed(now - task.started)}"
        self.console.print(escape(f"{line}  {info}".rstrip()), highlight=False, soft_wrap=True)


def progress_info(m: dict[str, float]) -> str:
    """The key metrics a progress line shows: loss, mean reward, the MOPD reverse KL."""
    parts = []
    for key in ("loss", "reward/mean", "mopd/reverse_kl"):
        if key in m:
            parts.append(f"{key.split('/')[0] if key != 'mopd/reverse_kl' else 'rkl'}={m[key]:.3f}")
    return " ".join(parts)


def logged_step(metrics_path: Path) -> tuple[int, dict[str, float]] | None:
    """The last step a stage's metrics.jsonl records, with its metrics (None before the first, or unreadable).

    Why: a stage running in another process (a Ray worker) cannot call back into the driver's display; it
    writes its metrics log on the shared run directory, and the driver reads its last line."""
    try:
        lines = metrics_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record["step"], {k: v for k, v in record.items() if isinstance(v, (int, float))}
    return None


def stage_progress(console: Console, interval: float = PLAIN_INTERVAL_SECONDS) -> Progress | PlainProgress:
    """Rich bars when `console` is a terminal (or a notebook), plain lines otherwise."""
    if console.is_terminal or console.is_jupyter:
        return rich_progress(console)
    return PlainProgress(console, interval)
