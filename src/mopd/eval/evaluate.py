"""Held-out evaluation: greedy decoding on each domain's fixed eval set, scored by the domain's verifier."""

from __future__ import annotations

import torch

from ..envs import exact_match, get_domain
from ..sampling.sampler import sample


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    domains: list[str],
    *,
    size: int,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 256,
) -> dict[str, dict[str, float]]:
    """{domain: {"score": mean verifier reward, "accuracy": exact-match rate}} on the held-out sets."""
    results: dict[str, dict[str, float]] = {}
    for name in domains:
        domain = get_domain(name)
        problems = domain.eval_set(size, seed=seed)
        rewards: list[float] = []
        exact: list[bool] = []
        for i in range(0, len(problems), batch_size):
            chunk = problems[i : i + batch_size]
            batch = sample(model, tokenizer, [p.prompt for p in chunk], max_new_tokens=max_new_tokens,
                           temperature=0.0)
            for p, c in zip(chunk, batch.completions, strict=True):
                rewards.append(float(domain.verify(p, c)))
                exact.append(bool(exact_match(p, c)))
        results[name] = {"score": sum(rewards) / len(rewards), "accuracy": sum(exact) / len(exact)}
    return results
