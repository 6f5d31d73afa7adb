"""Numeric guards of the training loop: no update from a non-finite step, and a warning when a stage's curves
collapse although every number stays finite (`models.checkpoint.save_checkpoint` refuses non-finite weights).

Why: a blown-up step (NaN/inf loss or gradient) trained on would be saved as a finished stage, reused by every
rerun, and surface much later as a sampling error far from its cause. The loop stops at the first such step
(`nonfinite: stop`, one line naming stage, step and metric) or skips its update and counts it (`skip`).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable


def nonfinite_message(stage: str, step: int, metric: str, value: float) -> str:
    """What a non-finite step is, in one line: the stage, the step and the metric."""
    return f"stage {stage!r}: step {step}: {metric} is {value} (not finite)"


class DivergenceWatch:
    """Warns once when a stage's reward collapses or its reverse KL blows up while every number stays finite
    (e.g. a too-high learning rate with gradient clipping on: scores fall to 0 with no NaN anywhere).

    Over windows of `window` steps: the reward's window mean falls below `drop` x its best window mean (once that
    best reached `min_best`), or the reverse KL's window mean exceeds `rise` x its first window's mean plus 1 nat.
    """

    def __init__(self, stage: str, warn: Callable[[str], None] | None = None, window: int = 10,
                 drop: float = 0.25, min_best: float = 0.2, rise: float = 10.0):
        self.stage, self.window, self.drop, self.min_best, self.rise = stage, window, drop, min_best, rise
        self.warn = warn or logging.getLogger("mopd").warning
        self.rewards: deque[float] = deque(maxlen=window)
        self.kls: deque[float] = deque(maxlen=window)
        self.best_reward = -math.inf
        self.first_kl: float | None = None
        self.warned = False

    def observe(self, step: int, metrics: dict[str, float]) -> str | None:
        """Feed one step's metrics; returns (and warns with) the message the first time a collapse shows."""
        if self.warned:
            return None
        message = None
        if "reward/mean" in metrics:
            self.rewards.append(float(metrics["reward/mean"]))
            if len(self.rewards) == self.window:
                mean = sum(self.rewards) / self.window
                self.best_reward = max(self.best_reward, mean)
                if self.best_reward >= self.min_best and mean < self.drop * self.best_reward:
                    message = (f"reward/mean over the last {self.window} steps fell to {mean:.3f} from "
                               f"{self.best_reward:.3f}")
        kl = metrics.get("mopd/reverse_kl")
        if kl is not None and message is None:
            self.kls.append(float(kl))
            if len(self.kls) == self.window:
                mean = sum(self.kls) / self.window
                if self.first_kl is None:
                    self.first_kl = mean
                elif mean > self.rise * max(self.first_kl, 0.0) + 1.0:
                    message = f"mopd/reverse_kl over the last {self.window} steps rose to {mean:.3f} from {self.first_kl:.3f}"
        if message is None:
            return None
        self.warned = True
        full = f"stage {self.stage!r}: step {step}: {message}: training may have diverged (too high `lr`?)"
        self.warn(full)
        return full
