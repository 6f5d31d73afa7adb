"""Experiment trackers (TensorBoard, Weights & Biases, trackio, MLflow), each an optional extra, fed every
metrics.jsonl record of a run through one fan-out (`fanout.Trackers`); the recipe's `logging:` or `--log NAME`
turns them on. With none on, nothing is imported and nothing is written."""

from .base import TRACKER_NAMES, enabled, missing_extra, numbers, with_trackers
from .fanout import STATE_FILE, TRACKING_DIR, Trackers, open_trackers

__all__ = ["STATE_FILE", "TRACKER_NAMES", "TRACKING_DIR", "Trackers", "enabled", "missing_extra", "numbers",
           "open_trackers", "with_trackers"]
