"""One mopd run's trackers: every metrics.jsonl record goes to each as `<stage>/<metric>` at one global step.

Why a global step: stages run one after another and each counts its steps from 1, while trackers want one
increasing step per run. Stage `s` owns the steps `offset[s] .. offset[s] + steps` (its final eval record sits at
its last step), fixed by the recipe, so a rerun puts each record at the same step; summary values go one step
past the last stage's.

Why a watermark: a stage resumed after a kill redoes the steps after its checkpoint, and a rerun replays the
records of stages finished earlier. RUN/tracking/state.json keeps the tracker run's id and, per stage, the last
record sent (its step and its position among that step's records): such records are not sent again, so no
tracker sees a step twice (TensorBoard also purges from the first step a process writes, `purge_step`). The
watermark is written after the trackers took a record, so a kill between the two can repeat that one record in
an append-only store (W&B, trackio, MLflow). A recipe whose stages changed (another identity or layout) starts a
new tracker run.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.run_dir import SAMPLES
from ..core.schema import LoggingSettings
from ..eval.transcripts import read_transcripts, render
from ..models.checkpoint import write_json_atomic
from .base import Tracker, TrackerRun, enabled, missing_extra, numbers

TRACKING_DIR = "tracking"
SAMPLE_COLUMNS = ("step", "domain", "reward", "prompt", "transcript")  # a samples table's columns
STATE_FILE = "state.json"


class Trackers:
    """The fan-out: records in, each tracker's `log` out, at most once per (stage, step, position)."""

    def __init__(self, trackers: list[Tracker], directory: Path, state: dict[str, Any], offsets: dict[str, int],
                 end: int = 0):
        self.trackers = trackers
        self.end = end  # one past the run's last global step: where summary values go
        self.path = directory / STATE_FILE
        self.state = state
        self.offsets = offsets
        self.seen: dict[str, dict[int, int]] = {}  # stage -> step -> records of that step met in this process
        self.evals: dict[str, float] = {}  # `<stage>/eval/<domain>` -> the latest score

    def recorder(self, stage: str) -> Callable[[dict], None] | None:
        """The per-record callback for a stage's MetricsLog (None when no tracker is on)."""
        return (lambda record: self.record(stage, record)) if self.trackers else None

    def record(self, stage: str, record: dict) -> None:
        if not self.trackers:
            return
        step = int(record.get("step", 0))
        per_step = self.seen.setdefault(stage, {})
        position = per_step[step] = per_step.get(step, 0) + 1
        metrics = {f"{stage}/{k}": v for k, v in numbers(record).items()}
        self.evals.update({k: v for k, v in metrics.items() if k.startswith(f"{stage}/eval/")})
        last = self.state["logged"].get(stage)
        if last is not None and (step, position) <= tuple(last):
            return  # sent before this process (a resumed stage's redone step, or a replayed record)
        for tracker in self.trackers:
            tracker.log(metrics, self.offsets.get(stage, 0) + step)
        self.state["logged"][stage] = [step, position]
        write_json_atomic(self.path, self.state)

    def replay(self, stage: str, metrics_path: Path) -> None:
        """Send a stage's metrics.jsonl records not sent yet: a stage finished in an earlier run, or one whose
        kind writes its file directly (merge, eval)."""
        if not self.trackers or not metrics_path.is_file():
            return
        self.seen[stage] = {}
        for line in metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(record, dict):
                self.record(stage, record)

    def samples(self, stage: str, stage_dir: Path) -> None:
        """Send a stage's logged rollouts not sent yet (`samples/train-<step>.jsonl`, `log_samples`) as one table,
        `<stage>/samples`, with a step column, at the global step of the last of them (W&B: at its latest step,
        since it drops a step below it and merges one key logged twice at a step). Called when a stage ends, as
        `replay`: the stages of every executor get there, and a rerun sends nothing twice."""
        if not self.trackers:
            return
        sent = self.state.setdefault("samples", {})
        rows, last = [], sent.get(stage, 0)
        for path in sorted(Path(stage_dir, SAMPLES).glob("train-*.jsonl")):
            step = int(path.stem.split("-", 1)[1])
            if step > sent.get(stage, 0):
                rows += [[r.get("step"), r.get("domain"), r.get("reward"), r.get("prompt"), render(r)]
                         for r in read_transcripts(path)]
                last = step
        if last == sent.get(stage, 0):
            return
        for tracker in self.trackers:
            tracker.table(f"{stage}/samples", list(SAMPLE_COLUMNS), rows, self.offsets.get(stage, 0) + last)
        sent[stage] = last
        write_json_atomic(self.path, self.state)

    def summary(self, report: dict | None) -> None:
        """The final scores: each stage's last eval and the report's numbers (`report/normalized_score`, ...)."""
        if not self.trackers:
            return
        values = dict(self.evals)
        values.update({f"report/{k}": v for k, v in numbers(report or {}).items()})
        if values == self.state.get("summary"):
            return  # a rerun with nothing new: the trackers have these already
        for tracker in self.trackers:
            tracker.summary(values, self.end)
        self.state["summary"] = values
        write_json_atomic(self.path, self.state)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)  # a kill or an error: the tracker runs say so (resumed later)


def open_trackers(settings: LoggingSettings, out: Path, *, project: str, config: dict[str, Any],
                  spans: dict[str, tuple[str, int]]) -> Trackers:
    """Open the trackers `settings` turns on for the run directory `out` (no tracker: a fan-out that does
    nothing and writes nothing). `spans`: stage -> (identity, steps), in run order; `config` is the tracker
    run's config. A tracker whose library is missing is one ValueError line naming the extra."""
    names = enabled(settings)
    for name in names:
        if why := missing_extra(name):
            raise ValueError(why)
    offsets, at = {}, 0
    for stage, (_, steps) in spans.items():
        offsets[stage] = at
        at += steps + 1
    directory = Path(out) / TRACKING_DIR
    if not names:
        return Trackers([], directory, {}, offsets, at)
    layout = {stage: [offsets[stage], identity] for stage, (identity, _) in spans.items()}
    state = _state(directory / STATE_FILE, layout)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / STATE_FILE, state)
    run = TrackerRun(directory=directory, run_id=state["run_id"], run_name=f"{project}-{state['run_id']}",
                     project=project, config=config)
    trackers: list[Tracker] = []
    for name in names:
        try:
            trackers.append(_open(name, getattr(settings, name), run))
        except BaseException as e:
            for tracker in trackers:
                tracker.close(failed=True)
            if not isinstance(e, Exception):
                raise
            # e.g. W&B online with no API key: one line, before any stage runs
            first = (str(e).strip().splitlines() or [""])[0]
            raise ValueError(f"could not open the {name} tracker: {e.__class__.__name__}: {first}") from e
    return Trackers(trackers, directory, state, offsets, at)


def _state(path: Path, layout: dict[str, list]) -> dict[str, Any]:
    """The saved state when its stages agree with `layout` (same offsets and identities), else a new run's."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    readable = (isinstance(saved, dict) and isinstance(saved.get("run_id"), str)
                and isinstance(saved.get("layout"), dict) and isinstance(saved.get("logged"), dict))
    if readable and all(layout.get(s) == where for s, where in saved["layout"].items() if s in layout):
        logged = {s: v for s, v in saved["logged"].items() if s in layout}
        samples = {s: v for s, v in (saved.get("samples") or {}).items() if s in layout}
        return {"run_id": saved["run_id"], "layout": {**saved["layout"], **layout}, "logged": logged,
                "summary": saved.get("summary"), "samples": samples}
    return {"run_id": secrets.token_hex(4), "layout": layout, "logged": {}}


def _open(name: str, settings: Any, run: TrackerRun) -> Tracker:
    if name == "tensorboard":
        from .tensorboard_tracker import TensorBoardTracker

        return TensorBoardTracker(run)
    if name == "wandb":
        from .wandb_tracker import WandbTracker

        return WandbTracker(settings, run)
    if name == "trackio":
        from .trackio_tracker import TrackioTracker

        return TrackioTracker(settings, run)
    from .mlflow_tracker import MlflowTracker

    return MlflowTracker(settings, run)
