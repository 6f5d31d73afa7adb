"""Held-out evaluation: greedy decoding on each domain's fixed eval set, scored by the domain's verifier.

Each domain's result keeps its per-prompt rewards (in held-out order) beside their mean, so a comparison over
seeds can resample prompts for its intervals (`report.compare_intervals`); the mean is computed from the same
list as before, so no score changes.

Generation length: a domain that declares its own `max_new_tokens` (a data domain's `max_new_tokens:` in the
recipe, a registered domain's `register_domain(..., max_new_tokens=N)`) is decoded that far, every other domain
`eval.max_new_tokens` far: real-text answers need more tokens than the character puzzles' 12, and one length for
all would either cut the former or waste time on the latter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from ..core.batch import RolloutBatch
from ..core.schema import EvalSettings
from ..envs import DomainLike, exact_match
from ..envs.tool_domains import is_agentic
from ..models.prompting import RAW, PromptFormat
from ..sampling.sampler import sample
from .episodes import evaluate_episodes


def generation_length(domain: DomainLike, settings: EvalSettings, override: int | None = None) -> int:
    """Greedy tokens per held-out prompt of `domain`: `override` if given, else the domain's own
    `max_new_tokens` if it declares one, else `settings.max_new_tokens`."""
    return override or getattr(domain, "max_new_tokens", None) or settings.max_new_tokens


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    domains: Sequence[DomainLike],
    settings: EvalSettings,
    prompt_format: PromptFormat = RAW,
    max_new_tokens: int | None = None,
    on_batch: Callable[[RolloutBatch], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """{domain: {"score": mean verifier reward, "accuracy": exact-match rate, "rewards": per-prompt rewards}} on
    the held-out sets.

    Args:
        max_new_tokens: one generation length for every domain, over their own (`mopd eval --max-new-tokens`);
            None: each domain's (`generation_length`). Tool-use domains keep their episode limits.
        on_batch: called with each decoded chunk as a rewarded batch (domains, references and rewards set), in
            held-out order: what the transcripts are made from (`eval.transcripts`).
    """
    results: dict[str, dict[str, Any]] = {}
    for domain in domains:
        problems = domain.eval_set(settings.size, seed=settings.seed)
        if is_agentic(domain):  # a tool-use domain: greedy episodes (eval/episodes.py)
            results[domain.name] = evaluate_episodes(model, tokenizer, domain, problems, settings, prompt_format,
                                                     on_batch)
            continue
        length = generation_length(domain, settings, max_new_tokens)
        rewards: list[float] = []
        exact: list[bool] = []
        for i in range(0, len(problems), settings.batch_size):
            chunk = problems[i : i + settings.batch_size]
            batch = sample(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=length,
                           temperature=0.0, prompt_format=prompt_format)
            for p, c in zip(chunk, batch.completions, strict=True):
                rewards.append(float(domain.verify(p, c)))
                exact.append(bool(exact_match(p, c)))
            if on_batch is not None:
                on_batch(replace(batch, domains=[p.domain for p in chunk], references=[p.answer for p in chunk],
                                 rewards_B=torch.tensor(rewards[i:], device=batch.input_ids_B_T.device)))
        results[domain.name] = {"score": sum(rewards) / len(rewards), "accuracy": sum(exact) / len(exact),
                                "rewards": rewards}
    return results
