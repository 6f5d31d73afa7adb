"""The bootstrap behind every interval (`mopd.report.stats`, `compare_intervals`, `compare_seeds`) on cases whose
answer is known exactly (scipy is not a dependency, so the checks are against exact formulas), plus the
comparison table's intervals on hand-made stage directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mopd.models.integrity import sealed_lineage
from mopd.report.compare import build_compare
from mopd.report.compare_intervals import compare_intervals
from mopd.report.compare_seeds import mean_over_seeds
from mopd.report.stats import (
    make_draws,
    mean_interval,
    over_seeds,
    paired_difference,
    percentile_interval,
    replicate_means,
    replicate_se,
    resample_weights,
    standard_error,
)

# ---------------------------------------------------------------------------------------------- stats


def test_resample_weights_are_draws_of_n_with_replacement() -> None:
    w = resample_weights(np.random.default_rng(0), 7, 500)
    assert w.shape == (500, 7)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert np.allclose((w * 7) % 1, 0)  # counts / n


def test_interval_of_a_constant_is_the_constant() -> None:
    assert mean_interval(np.full(20, 0.375)) == pytest.approx((0.375, 0.375))
    draws = make_draws(3, {"a": 10})
    per_seed = replicate_means(np.full((3, 10), 0.5), draws.prompts["a"])
    reps = over_seeds(per_seed, draws.seeds)
    assert percentile_interval(reps) == pytest.approx((0.5, 0.5))
    assert replicate_se(reps) == pytest.approx(0.0)


def test_percentile_interval_is_the_central_quantiles() -> None:
    x = np.arange(1001, dtype=float)  # quantiles 2.5% and 97.5% of 0..1000 are 25 and 975 exactly
    assert percentile_interval(x) == pytest.approx((25.0, 975.0))
    assert percentile_interval(np.array([np.nan] * 6 + [1.0] * 4)) is None  # mostly undefined


def test_replicate_mean_is_a_weighted_mean_and_nan_seeds_count_only_when_drawn() -> None:
    rewards = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    w = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert replicate_means(rewards, w).tolist() == [[0.5, 1.0], [0.0, 1.0]]
    per_seed = np.array([[0.2, 0.4], [np.nan, np.nan]])  # (seeds, replicates): seed 1 undefined
    seeds = np.array([[1.0, 0.0], [0.5, 0.5]])
    out = over_seeds(per_seed, seeds)
    assert out[0] == pytest.approx(0.2) and np.isnan(out[1])


def test_bootstrap_standard_error_of_a_mean_matches_the_formula() -> None:
    x = np.random.default_rng(1).normal(size=60)
    draws = make_draws(1, {"a": 60}, seeds=False, b=20000)
    se = replicate_se(over_seeds(replicate_means(x[None, :], draws.prompts["a"]), draws.seeds))
    exact = np.sqrt((x.size - 1) / x.size) * standard_error(x)  # the bootstrap's plug-in variance
    assert se == pytest.approx(exact, rel=0.03)


def test_a_method_paired_with_itself_is_not_significant_and_a_shift_is() -> None:
    rng = np.random.default_rng(2)
    rewards = rng.integers(0, 2, size=(3, 40)).astype(float)
    draws = make_draws(3, {"a": 40})
    a = over_seeds(replicate_means(rewards, draws.prompts["a"]), draws.seeds)
    same = paired_difference(a, a)
    assert same == {"ci": [0.0, 0.0], "significant": False}
    better = np.minimum(rewards + (rng.random((3, 40)) < 0.5), 1.0)  # solves every prompt a solved, and more
    b = over_seeds(replicate_means(better, draws.prompts["a"]), draws.seeds)
    diff = paired_difference(b, a)
    assert diff["significant"] and diff["ci"][0] > 0


def test_coverage_of_a_normal_mean_is_near_95_percent() -> None:
    rng = np.random.default_rng(3)
    trials, n, mu = 400, 40, 1.5
    hits = 0
    for t in range(trials):
        lo, hi = mean_interval(rng.normal(mu, 2.0, size=n), b=1000, seed=t)
        hits += lo <= mu <= hi
    # the percentile interval undercovers slightly at n = 40 (about 0.93); 400 trials: sd of the rate 0.012
    assert 0.89 <= hits / trials <= 0.98, hits / trials


# ---------------------------------------------------------------------------------------------- the table


def _stage(run: Path, name: str, rewards: dict[str, list[float]], samples: int = 0) -> None:
    (run / name / "final").mkdir(parents=True)
    evals = {d: {"score": sum(r) / len(r), "accuracy": 0.0, "rewards": r} for d, r in rewards.items()}
    lineage = sealed_lineage(run / name / "final", {"metrics": {"eval": evals}})
    (run / name / "final" / "mopd.json").write_text(json.dumps(lineage))
    (run / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": samples}) + "\n")


def _run(run: Path, shift: float) -> None:
    """start scores 0.25 / 0.5, teachers 0.75 / 1.0; `m` recovers half, `same` equals `m`, `low` scores start."""
    _stage(run, "sft", {"a": [0, 0, 1, 0], "b": [1, 0, 1, 0]})
    _stage(run, "ta", {"a": [1, 1, 1, 0], "b": [1, 1, 1, 1]})
    _stage(run, "tb", {"a": [1, 1, 1, 0], "b": [1, 1, 1, 1]})
    _stage(run, "m", {"a": [shift, 0, 1, 0], "b": [1, 0, 1, 0.5]}, samples=8)
    _stage(run, "same", {"a": [shift, 0, 1, 0], "b": [1, 0, 1, 0.5]})
    _stage(run, "low", {"a": [0, 0, 1, 0], "b": [1, 0, 1, 0]})
    stages = {s: {"kind": "x", "wall_seconds": 1.0} for s in ("sft", "ta", "tb", "m", "same", "low")}
    (run / "run.json").write_text(json.dumps({"recipe": "known", "stages": stages,
                                              "report": {"start": "sft", "student": "m", "teachers": {}}}))


PLAN = {
    "start": "sft", "teachers": {"a": "ta", "b": "tb"}, "curves": [], "reference": "MOPD",
    "methods": {"MOPD": {"stage": "m", "kind": "mopd", "chain": ["m"], "extra": []},
                "Same": {"stage": "same", "kind": "mopd", "chain": ["same"], "extra": []},
                "Low": {"stage": "low", "kind": "merge", "chain": ["low"], "extra": []}},
}


def test_two_seed_table_means_intervals_and_paired_marks(tmp_path: Path) -> None:
    dirs = [tmp_path / "seed-0", tmp_path / "seed-1"]
    _run(dirs[0], 1.0)
    _run(dirs[1], 0.0)
    result = build_compare(tmp_path, PLAN, dirs)
    m = result["methods"]["MOPD"]
    # seed 0: a (0.5-0.25)/0.5 = 0.5, b (0.625-0.5)/0.5 = 0.25 -> 0.375; seed 1: a 0, b 0.25 -> 0.125
    assert m["per_seed"] == pytest.approx([0.375, 0.125])
    assert m["normalized_score"] == pytest.approx(0.25)
    assert m["domains"]["a"]["score"] == pytest.approx(0.375)
    lo, hi = m["normalized_interval"]["ci"]
    assert lo < 0.25 < hi and m["normalized_interval"]["se"] > 0
    assert result["methods"]["Same"]["vs_reference"] == {"reference": "MOPD", "difference": 0.0,
                                                         "ci": [0.0, 0.0], "significant": False}
    low = result["methods"]["Low"]["vs_reference"]
    assert low["difference"] == pytest.approx(-0.25) and low["ci"][1] <= 0
    # the start's own interval: 4 prompts of reward 0/0/1/0 in both seeds
    assert result["start"]["intervals"]["a"]["ci"][0] == 0.0
    md = (tmp_path / "compare.md").read_text()
    assert "| vs MOPD |" in md and "(reference)" in md and "+0.000 [+0.000, +0.000] |" in md
    assert "**0.250 ±" in md and "| seed-0 | seed-1 |" in md
    assert json.loads((tmp_path / "compare.json").read_text())["intervals"]["seeds"] == 2


def test_one_seed_reproduces_its_plain_numbers_and_old_runs_get_no_interval(tmp_path: Path) -> None:
    _run(tmp_path / "one", 1.0)
    one = build_compare(tmp_path / "one", PLAN)
    assert one["methods"]["MOPD"]["normalized_score"] == pytest.approx(0.375)
    assert one["intervals"]["over"] == "held-out prompts"
    # a stage saved before per-prompt rewards existed: cells keep the mean alone
    iv = compare_intervals([tmp_path / "nowhere"], PLAN, "MOPD")
    assert iv["scores"] == {} and iv["methods"] == {}


def test_mean_over_seeds_is_none_when_a_seed_is_undefined() -> None:
    def seed(norm):
        return {"recipe": "r", "start": {"stage": "s", "domains": {"a": 0.1}},
                "teachers": {"a": {"stage": "t", "score": 0.9}},
                "methods": {"M": {"stage": "m", "kind": "mopd", "normalized_score": norm,
                                  "domains": {"a": {"score": 0.5, "recovery": norm}}, "samples": 10,
                                  "other_samples": 0, "wall_seconds": 2.0, "stages": ["m"]}},
                "sample_efficiency": {"M": [[0, 0.0], [10, norm or 0.0]]}}
    merged = mean_over_seeds([seed(0.5), seed(None)])
    assert merged["methods"]["M"]["normalized_score"] is None and merged["methods"]["M"]["per_seed"] == [0.5, None]
    merged = mean_over_seeds([seed(0.5), seed(0.7)])
    assert merged["sample_efficiency"]["M"] == [[0.0, 0.0], [10.0, pytest.approx(0.6)]]
    band = merged["sample_efficiency_bands"]["M"]
    assert band[0] == [0.0, 0.0, 0.0] and band[1][1] == pytest.approx(0.5) and band[1][2] == pytest.approx(0.7)
