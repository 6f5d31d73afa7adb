"""Held-out evaluation: greedy decoding on each domain's fixed eval set, scored by the domain's verifier.

Each domain's result keeps its per-prompt rewards (in held-out order) beside their mean, so a comparison over
seeds can resample prompts for its intervals (`report.compare_intervals`); the mean is computed from the same
list as before, so no score changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.schema import EvalSettings
from ..envs import DomainLike, exact_match
from ..envs.tool_domains import is_agentic
from ..models.prompting import RAW, PromptFormat
from ..sampling.sampler import sample
from .episodes import evaluate_episodes


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    domains: Sequence[DomainLike],
    settings: EvalSettings,
    prompt_format: PromptFormat = RAW,
) -> dict[str, dict[str, Any]]:
    """{domain: {"score": mean verifier reward, "accuracy": exact-match rate, "rewards": per-prompt rewards}} on
    the held-out sets."""
    results: dict[str, dict[str, Any]] = {}
    for domain in domains:
        problems = domain.eval_set(settings.size, seed=settings.seed)
        if is_agentic(domain):  # a tool-use domain: greedy episodes (eval/episodes.py)
            results[domain.name] = evaluate_episodes(model, tokenizer, domain, problems, settings, prompt_format)
            continue
        rewards: list[float] = []
        exact: list[bool] = []
        for i in range(0, len(problems), settings.batch_size):
            chunk = problems[i : i + settings.batch_size]
            batch = sample(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=settings.max_new_tokens,
                           temperature=0.0, prompt_format=prompt_format)
            for p, c in zip(chunk, batch.completions, strict=True):
                rewards.append(float(domain.verify(p, c)))
                exact.append(bool(exact_match(p, c)))
        results[domain.name] = {"score": sum(rewards) / len(rewards), "accuracy": sum(exact) / len(exact),
                                "rewards": rewards}
    return results
