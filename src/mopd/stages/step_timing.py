"""Where a sampling step's time goes, in its metrics: `time/sampling_s` (rollouts and rewards),
`time/teachers_s` (teacher scoring), `time/learner_s` (the student's forward and backward, the rest of the loss)
and, from the driver, `time/update_s` (clipping and the optimizer step).

Why: a user comparing settings (or tools) needs the split, not only the step's wall time; the benchmark reads it
from metrics.jsonl like any other metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SCORING = ("sampled_logprobs", "topk", "full_logits", "logit_blocks")


class TimedScorer:
    """A teacher panel whose scoring calls (and the logit blocks they hand out) add their wall time to `seconds`."""

    def __init__(self, panel: Any):
        self.panel, self.seconds = panel, 0.0

    def _timed(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
            return self._timed(out) if getattr(fn, "__name__", "") == "logit_blocks" else out

        call.__name__ = getattr(fn, "__name__", "blocks")
        return call

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.panel, name)
        return self._timed(attr) if name in SCORING else attr
