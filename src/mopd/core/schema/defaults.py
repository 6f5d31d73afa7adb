"""Defaults a recipe gets from the schema that code below the recipe also falls back on when it is called
without one (the policy-gradient loss in a test, a domain's held-out set in `mopd eval`).

Why one module: a default written both in the schema and in a function signature drifts the day one of them is
edited, and then a recipe that leaves the setting out and a caller that leaves the argument out get different
numbers. Both import it from here; it imports nothing, so any layer may.
"""

from __future__ import annotations

from typing import Literal

# The seed of every domain's fixed held-out set (`eval.seed`): the same prompts in every run and every stage.
HELD_OUT_SEED = 1234
# Its size per domain (`eval.size`); a data domain holds out at most this many of its records by default.
HELD_OUT_SIZE = 96

# The importance correction of the policy-gradient loss (`learner.losses.policy_gradient_loss`): truncate tokens
# whose sampler/learner ratio leaves [EPS_LOW, EPS_HIGH], and clip advantages to [-ADV_CLIP, ADV_CLIP].
ISMode = Literal["truncate", "clip", "none"]
IS_MODE: ISMode = "truncate"
EPS_LOW = 0.5
EPS_HIGH = 2.0
ADV_CLIP = 5.0

# The least gain a teacher must make over the start on a domain for the report's recovery of it to be defined
# (`report.min_teacher_gain`, `report.scores.recovery`); below it the domain is "teacher gain too small".
MIN_TEACHER_GAIN = 0.05
