"""What every experiment tracker shares: the protocol the fan-out calls, what a tracker opens with, which extra
installs each, and how a metrics.jsonl record becomes `<stage>/<metric>` numbers.

Why one protocol: a run writes to any set of trackers (TensorBoard, W&B, trackio, MLflow) through one fan-out
(`tracking.fanout.Trackers`), which alone decides what is logged at which step; each tracker only speaks its own
library.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.schema import LoggingSettings

# tracker -> (the extra that installs it, the modules it imports)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard",)),
    "wandb": ("wandb", ("wandb",)),
    "trackio": ("trackio", ("trackio",)),
    "mlflow": ("mlflow", ("mlflow", "sqlalchemy", "alembic")),
}
TRACKER_NAMES = tuple(EXTRAS)


class Tracker(Protocol):
    """One tracker's run, opened for a mopd run; steps are the run's global steps (see `fanout`)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def summary(self, values: dict[str, float], step: int) -> None: ...

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None: ...  # transcripts

    def close(self, failed: bool = False) -> None: ...  # failed: the run stopped on an exception


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is opened with: the same for every tracker of a run."""

    directory: Path  # RUN/tracking: local stores and event files go under it
    run_id: str  # stable across resumes (kept in RUN/tracking/state.json)
    run_name: str  # shown in the trackers' UIs
    project: str  # default project / experiment name: the recipe's name
    config: dict[str, Any]  # the recipe, stage identities and lineage


def enabled(settings: LoggingSettings) -> list[str]:
    """The trackers a recipe's `logging:` turns on, in a fixed order."""
    return [name for name in TRACKER_NAMES if getattr(settings, name) not in (None, False)]


def missing_extra(name: str) -> str | None:
    """Why tracker `name` cannot run here (one line naming the extra to install), or None."""
    extra, modules = EXTRAS[name]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"the {name} tracker needs {', '.join(missing)}: pip install 'mopd[{extra}]'"


def with_trackers(settings: LoggingSettings, names: list[str]) -> LoggingSettings:
    """`settings` with each tracker in `names` turned on (with its defaults unless the recipe configured it)."""
    unknown = [n for n in names if n not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0]!r}; known: {', '.join(TRACKER_NAMES)}")
    fields = LoggingSettings.model_fields
    update: dict[str, Any] = {}
    for name in names:
        if getattr(settings, name) in (None, False):
            annotation = fields[name].annotation
            update[name] = True if annotation is bool else _settings_class(annotation)()
    return settings.model_copy(update=update)


def _settings_class(annotation: Any) -> type:
    """`X | None` -> X."""
    return next(a for a in annotation.__args__ if a is not type(None))


def numbers(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """A record's numeric values, nested keys joined with '/' (`{"eval": {"m": {"score": 1}}}` ->
    `eval/m/score`); strings, lists and None are left out (they are not metrics)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numbers(value, f"{name}/"))
        elif isinstance(value, int | float):  # bool is an int: a flag logs as 0 / 1
            out[name] = float(value)
    return out
