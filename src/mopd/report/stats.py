"""The statistics behind every interval the comparison and sweep reports print: a crossed bootstrap over seeds
and held-out prompts, percentile intervals, and paired differences.

Why a crossed bootstrap: a method's score varies with its training seed and with which prompts the held-out set
happens to hold. Every stage of a run is scored on the same fixed held-out set (the eval seed does not change
with the training seed), so seeds and prompts are crossed factors. One bootstrap replicate draws seeds with
replacement and, per domain, prompts with replacement, and applies the same draw to every method: differences
between methods are then paired over seeds and prompts, and what the methods share (the same hard prompts, the
same seed's shared parents) cancels out of the difference instead of widening its interval.

A draw is kept as weights (multinomial counts / n), so a replicate's mean is a matrix product and thousands of
replicates cost milliseconds. Intervals are percentile intervals: with a handful of seeds they are too narrow
(three seeds allow only ten distinct seed draws), which the report says next to the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 20260  # the bootstrap's own generator seed: a report rebuilt from the same files prints the same intervals


@dataclass(frozen=True)
class Draws:
    """One set of bootstrap replicates: per replicate, a weight for each seed and, per domain, for each prompt.

    seeds: (B, S), prompts[domain]: (B, P); each row sums to 1. The same Draws scores every method, so the
    replicates of two methods are paired."""

    seeds: np.ndarray
    prompts: dict[str, np.ndarray]

    @property
    def size(self) -> int:
        return self.seeds.shape[0]


def resample_weights(rng: np.random.Generator, n: int, b: int) -> np.ndarray:
    """(b, n): each row the counts of a draw of n items with replacement, divided by n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b) / n


def make_draws(n_seeds: int, n_prompts: Mapping[str, int], *, seeds: bool = True, prompts: bool = True,
               b: int = RESAMPLES, seed: int = SEED) -> Draws:
    """Replicates that resample seeds and/or prompts; a factor not resampled keeps equal weights (its mean)."""
    rng = np.random.default_rng(seed)
    seed_w = resample_weights(rng, n_seeds, b) if seeds else np.full((b, n_seeds), 1.0 / n_seeds)
    prompt_w = {d: resample_weights(rng, p, b) if prompts else np.full((b, p), 1.0 / p)
                for d, p in n_prompts.items()}
    return Draws(seed_w, prompt_w)


def replicate_means(rewards: np.ndarray, prompt_weights: np.ndarray) -> np.ndarray:
    """Per-seed mean reward in each replicate: rewards (S, P) and weights (B, P) -> (S, B)."""
    return np.asarray(rewards, dtype=float) @ prompt_weights.T


def over_seeds(per_seed: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """The replicate's mean over its drawn seeds: per_seed (S, B), seed_weights (B, S) -> (B,). NaN in a drawn
    seed makes the replicate NaN (a seed weighted 0 does not count)."""
    drawn = seed_weights.T > 0
    values = np.where(drawn, per_seed, 0.0)
    out = (values * seed_weights.T).sum(axis=0)
    bad = (np.isnan(per_seed) & drawn).any(axis=0)
    return np.where(bad, np.nan, out)


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central `level` percentile interval of the finite replicates; None when fewer than half are finite
    (the statistic is undefined in most draws)."""
    x = np.asarray(replicates, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0 or x.size < 0.5 * np.asarray(replicates).size:
        return None
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return float(lo), float(hi)


def replicate_se(replicates: np.ndarray) -> float | None:
    """The bootstrap standard error: the standard deviation of the finite replicates."""
    x = np.asarray(replicates, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1)) if x.size > 1 else None


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict | None:
    """a - b over paired replicates: {"ci": [lo, hi], "significant": the interval excludes 0}; None when
    undefined."""
    ci = percentile_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), level)
    if ci is None:
        return None
    return {"ci": [ci[0], ci[1]], "significant": bool(ci[0] > 0 or ci[1] < 0)}


def mean_interval(x: np.ndarray, level: float = LEVEL, b: int = RESAMPLES,
                  seed: int = SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of a 1-d sample (the one-factor case of the above)."""
    x = np.asarray(x, dtype=float)
    w = resample_weights(np.random.default_rng(seed), x.size, b)
    return percentile_interval(w @ x, level)


def standard_error(x: np.ndarray) -> float | None:
    """Standard error of a sample mean, s / sqrt(n)."""
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else None
