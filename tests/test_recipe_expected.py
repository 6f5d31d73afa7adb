"""Every bundled recipe's metrics at a reduced scale against the numbers stored in tests/expected/<recipe>.json.

Why: a change that moves a recipe's results (a loss, a training reward, a held-out score, the report's recovery)
beyond a stated tolerance fails here with one line per metric naming the recipe, the stage, the metric, the stored
and measured values and the tolerance, as torchtune keeps expected losses per recipe. Exact (1e-6 relative) on the
machine kind the numbers were recorded on; bounds derived per metric kind on another (tests/recipe_expected.py
says which and why). scripts/check_behaviour.py is the other half: exact equality of everything two code versions
write, on one machine. When a change is meant to move the numbers, `scripts/record_expected.py` rewrites the
files.

The runs are tests/recipe_expected.py's groups, once per session: the report recipes' run is the one
test_bundled_recipes.py checks end to end, so running both modules costs one run.
"""

from __future__ import annotations

import copy
import json

import pytest

from mopd.cli_tools.bundled import bundled_recipes

from .recipe_expected import (
    COVERED,
    EXPECTED_DIR,
    GROUPS,
    K_PROMPTS,
    NOT_RUN,
    check,
    compare,
    expected_path,
    group_of,
    group_runs,
    machine,
    tolerance,
)


@pytest.mark.parametrize("name", COVERED)
def test_recipe_metrics_are_the_stored_numbers(name: str, tmp_path_factory) -> None:
    lines = check(name, group_runs(group_of(name), tmp_path_factory)[name])
    if lines:
        recorded = json.loads(expected_path(name).read_text())["recorded_on"]
        lines.append(f"(recorded on {_kind(recorded)}; this machine: {_kind(machine())}; if the change is meant to "
                     f"move these numbers: .venv/bin/python scripts/record_expected.py --recipes {name})")
        pytest.fail("\n".join(lines), pytrace=False)


def _kind(m: dict) -> str:
    return f"{m['cpu']}, {m['capability']}, torch {m['torch']}, {m['threads']} thread(s)"


def test_every_bundled_recipe_has_stored_numbers_or_a_stated_reason() -> None:
    """A new bundled recipe fails here until it joins a group (and is recorded) or NOT_RUN says why not."""
    assert set(COVERED).isdisjoint(NOT_RUN) and len(set(COVERED)) == len(COVERED)
    assert set(COVERED) | set(NOT_RUN) == set(bundled_recipes())
    assert {p.stem for p in EXPECTED_DIR.glob("*.json")} == set(COVERED)
    for name in COVERED:
        stored = json.loads(expected_path(name).read_text())
        assert stored["recipe"] == name and stored["scale"] == GROUPS[group_of(name)].scale, name


def _stored() -> dict:
    return {
        "recorded_on": {},
        "metrics": {"sft": {"loss": 2.0, "eval/reversal": 0.25},
                    "rl": {"loss": 0.01, "reward": 0.5, "eval/reversal": 0.5},
                    "report": {"eval/start/reversal": 0.25, "eval/teacher/reversal": 0.75,
                               "eval/student/reversal": 0.5, "recovery/reversal": 0.5, "normalized_score": 0.5}},
        "counts": {"sft": {"eval/reversal": 8}, "rl": {"reward": 32, "eval/reversal": 8},
                   "report": {f"eval/{r}/reversal": 8 for r in ("start", "teacher", "student")}},
    }


def test_a_moved_metric_is_one_line_with_recipe_stage_metric_values_and_tolerance() -> None:
    stored = _stored()
    measured = copy.deepcopy(stored)
    assert compare("demo", stored, measured, same=True) == []
    measured["metrics"]["sft"]["loss"] = 2.0001
    [line] = compare("demo", stored, measured, same=True)
    assert line.startswith("demo: sft: loss: stored 2, measured 2.0001, tolerance 2e-06")
    assert compare("demo", stored, measured, same=False) == []  # within 1e-3 relative elsewhere
    measured["metrics"]["sft"]["loss"] = 2.01
    [line] = compare("demo", stored, measured, same=False)
    assert line == "demo: sft: loss: stored 2, measured 2.01, tolerance 0.002 (loss: 0.001 relative; another " \
                   "machine kind)"


def test_across_machine_kinds_a_loss_over_sampled_completions_is_left_to_its_reward_and_scores() -> None:
    stored = _stored()
    stored["counts"]["rl"]["loss"] = 32  # the final step's loss was over 32 sampled completions
    measured = copy.deepcopy(stored)
    measured["metrics"]["rl"]["loss"] = 0.5
    assert compare("demo", stored, measured, same=False) == []
    assert len(compare("demo", stored, measured, same=True)) == 1


def test_across_machine_kinds_scores_may_move_by_whole_prompts_and_rewards_by_samples() -> None:
    stored = _stored()
    measured = copy.deepcopy(stored)
    measured["metrics"]["rl"].update({"eval/reversal": 0.5 + K_PROMPTS / 8, "reward": 0.5 - 2 / 32})
    assert compare("demo", stored, measured, same=False) == []
    assert len(compare("demo", stored, measured, same=True)) == 2
    measured["metrics"]["rl"]["eval/reversal"] = 0.5 + (K_PROMPTS + 1) / 8
    [line] = compare("demo", stored, measured, same=False)
    assert line.startswith("demo: rl: eval/reversal: stored 0.5, measured 0.875, tolerance 0.25 (2 of 8 held-out")


def test_a_recovery_is_bounded_by_its_scores_bounds_or_left_to_them() -> None:
    stored = _stored()  # gain 0.5 over 8 prompts: each score may move by 2/8, the gain may reach 0
    assert tolerance("report", "recovery/reversal", stored)[0] == float("inf")
    stored["counts"]["report"] = {f"eval/{r}/reversal": 80 for r in ("start", "teacher", "student")}
    bound, _ = tolerance("report", "recovery/reversal", stored)
    eps = K_PROMPTS / 80  # the worst corner: the student up and the start down, the teacher's gain unchanged
    assert bound == pytest.approx((0.25 + 2 * eps) / 0.5 - 0.5)
    assert tolerance("report", "normalized_score", stored)[0] == pytest.approx(bound)


def test_a_count_or_a_metric_that_changed_is_named() -> None:
    stored = _stored()
    measured = copy.deepcopy(stored)
    measured["counts"]["sft"]["eval/reversal"] = 10
    del measured["metrics"]["rl"]["reward"]
    measured["metrics"]["new_stage"] = {"loss": 1.0}
    assert compare("demo", stored, measured, same=False) == [
        "demo: sft: eval/reversal: a mean over 10, stored over 8",
        "demo: rl: reward: stored, not measured",
        "demo: stage new_stage: not in the stored numbers",
    ]
