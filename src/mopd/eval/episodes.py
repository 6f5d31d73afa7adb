"""Held-out evaluation of a tool-use domain: each eval problem played as a greedy episode (issue 18).

The score is the mean episode reward (the domain's verifier on the final answer; 0 for an episode that ran out of
turns or tokens), the accuracy the share of rewards of exactly 1 (an exact final answer under the partial-match
reward), and the report's agent figures: the share of episodes that called a tool, and the mean episode length in
completion-window tokens (model and observation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.batch import RolloutBatch
from ..core.schema import EvalSettings
from ..envs import Problem
from ..models.prompting import PromptFormat
from ..sampling.multi_turn import episode_rows, sample_episodes


def evaluate_episodes(model, tokenizer, domain, problems: list[Problem], settings: EvalSettings,
                      prompt_format: PromptFormat, on_batch: Callable[[RolloutBatch], None] | None = None,
                      ) -> dict[str, Any]:
    rewards: list[float] = []
    calls: list[bool] = []
    lengths: list[int] = []
    for i in range(0, len(problems), settings.batch_size):
        chunk = problems[i : i + settings.batch_size]
        rows = episode_rows(chunk, {domain.name: domain}, settings.max_new_tokens, prompt_format.chat_template)
        batch, stats = sample_episodes(model, tokenizer, rows, temperature=0.0, prompt_format=prompt_format)
        assert batch.rewards_B is not None
        if on_batch is not None:  # the episodes' rows, as played (eval.transcripts)
            on_batch(batch)
        rewards += [float(r) for r in batch.rewards_B.tolist()]
        calls += [s.tool_calls > 0 for s in stats]
        lengths += [s.tokens for s in stats]
    n = len(rewards)
    return {"score": sum(rewards) / n, "accuracy": sum(r == 1.0 for r in rewards) / n, "rewards": rewards,
            "tool_call_rate": sum(calls) / n, "episode_length": sum(lengths) / n}
