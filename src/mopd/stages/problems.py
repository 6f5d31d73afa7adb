"""The training problems of a step: balanced over the stage's domains, never a held-out eval prompt.

Everything random in a step is derived from (seed, step), so a stage resumed at step k draws exactly the
problems and tokens an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.schema import SamplingSettings
from ..envs import DomainLike, Problem
from .resolved import ResolvedStage
from .schedules import curriculum_levels


def step_seed(seed: int, step: int, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()[:8], "little") >> 1


def step_rng(seed: int, step: int) -> random.Random:
    return random.Random(step_seed(seed, step, "problems"))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, "sampling"))


@dataclass
class ProblemSource:
    """Problems drawn round-robin over `domains`, excluding each domain's held-out prompts (`exclude`)."""

    domains: Sequence[DomainLike]
    exclude: dict[str, frozenset[str]]
    difficulties: list[int] | None = None  # levels to train on; None = each domain's own
    curriculum: bool = False
    total_steps: int = 1
    weights: dict[str, float] | None = None  # domain -> relative share of a step's prompts; None = equal

    def draw(self, rng: random.Random, n: int, step: int | None = None) -> list[Problem]:
        """`n` problems; with `curriculum`, only the difficulty levels `curriculum_levels` allows at `step`."""
        out = []
        for d in self._domain_of_each(n):
            levels = [x for x in (self.difficulties or d.difficulties) if x in d.difficulties] or list(d.difficulties)
            if self.curriculum and step is not None:
                levels = curriculum_levels(levels, step, self.total_steps)
            out += d.sample_train(rng, 1, difficulty=rng.choice(levels), exclude=self.exclude[d.name])
        rng.shuffle(out)
        return out

    def _domain_of_each(self, n: int) -> list[DomainLike]:
        """Round-robin over the domains; with weights, each domain's count by largest remainder of its share of
        `n` (ties to the earlier domain), in round-robin order over the domains still owed a problem."""
        if not self.weights:
            return [self.domains[i % len(self.domains)] for i in range(n)]
        w = [float(self.weights.get(d.name, 1.0)) for d in self.domains]
        exact = [n * x / sum(w) for x in w]
        counts = [int(e) for e in exact]
        by_remainder = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        order: list[DomainLike] = []
        while len(order) < n:
            for i, d in enumerate(self.domains):
                if counts[i] > 0:
                    order.append(d)
                    counts[i] -= 1
        return order


def problem_source(ctx: ResolvedStage, domains: Sequence[DomainLike] | None = None) -> ProblemSource:
    """The source of a trained stage: its domains (or `domains`), its difficulties and curriculum."""
    s = ctx.settings
    chosen = list(domains or ctx.domains)
    ev = ctx.eval
    return ProblemSource(
        domains=chosen,
        exclude={d.name: d.held_out_prompts(ev.size, seed=ev.seed) for d in chosen},
        difficulties=s.difficulties,
        curriculum=isinstance(s, SamplingSettings) and s.curriculum,
        total_steps=s.steps,
        weights=s.domain_weights if isinstance(s, SamplingSettings) else None,
    )
