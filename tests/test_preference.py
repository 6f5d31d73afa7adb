"""The dpo and rejection_sampling stages (issue 20): the preference losses against values computed by hand, and a
miniature recipe (pretrain -> sft -> dpo on policy pairs, dpo on delta pairs, rejection sampling) run end to end,
with a dpo stage cut after a checkpoint resuming to the uninterrupted run's metrics and weights."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mopd.execution.runner import run_recipe
from mopd.learner.preference import preference_loss, sequence_logprobs
from mopd.models.integrity import stage_output_problem
from mopd.recipe.load import load_recipe
from mopd.stages import pairs as pairs_module

# two pairs; margins m = (pi_c - ref_c) - (pi_r - ref_r):
#   pair 0: (-1.0 + 1.5) - (-3.0 + 2.5) = 0.5 + 0.5 = 1.0
#   pair 1: (-2.0 + 2.0) - (-1.0 + 2.0) = 0 - 1 = -1.0
PI_C, PI_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0])


def test_dpo_sigmoid_loss_by_hand() -> None:
    """beta = 0.5: -log sigmoid(0.5) = log(1 + e^-0.5) = log 1.6065307 = 0.4740770,
    -log sigmoid(-0.5) = log(1 + e^0.5) = log 2.6487213 = 0.9740770; mean 0.7240770. The implicit reward
    margin beta * mean(m) = 0; accuracy 1/2 (only pair 0 has m > 0)."""
    loss, m = preference_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss="sigmoid")
    assert float(loss) == pytest.approx(0.7240770, abs=1e-6)
    assert m["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-7)
    assert m["dpo/accuracy"] == 0.5
    # implicit rewards beta * (pi - ref): chosen 0.5 * mean(0.5, 0) = 0.125, rejected 0.5 * mean(-0.5, 1) = 0.125
    assert m["dpo/chosen_reward"] == pytest.approx(0.125) and m["dpo/rejected_reward"] == pytest.approx(0.125)


def test_dpo_sigmoid_loss_gradient_by_hand() -> None:
    """d/dpi_c of -log sigmoid(beta m) = -beta (1 - sigmoid(beta m)) / P: at beta = 1 and the margins 1 and -1,
    -(1 - 0.7310586) / 2 = -0.1344707 and -(1 - 0.2689414) / 2 = -0.3655293."""
    pi_c = PI_C.clone().requires_grad_(True)
    loss, _ = preference_loss(pi_c, PI_R, REF_C, REF_R, beta=1.0, loss="sigmoid")
    loss.backward()
    assert pi_c.grad.tolist() == pytest.approx([-0.1344707, -0.3655293], abs=1e-6)


def test_ipo_loss_by_hand() -> None:
    """beta = 0.5: target margin 1 / (2 beta) = 1; (1 - 1)^2 = 0, (-1 - 1)^2 = 4; mean 2.
    beta = 0.25: target 2; (1 - 2)^2 = 1, (-1 - 2)^2 = 9; mean 5."""
    assert float(preference_loss(PI_C, PI_R, REF_C, REF_R, beta=0.5, loss="ipo")[0]) == pytest.approx(2.0)
    loss, m = preference_loss(PI_C, PI_R, REF_C, REF_R, beta=0.25, loss="ipo")
    assert float(loss) == pytest.approx(5.0)
    assert m["dpo/accuracy"] == 0.5


def test_all_positive_margins_are_full_accuracy() -> None:
    """Margins 2 and 4 at beta 0.1: reward margin 0.1 * 3 = 0.3, accuracy 1."""
    _, m = preference_loss(torch.tensor([0.0, 0.0]), torch.tensor([-2.0, -4.0]), torch.zeros(2), torch.zeros(2),
                           beta=0.1, loss="sigmoid")
    assert m["dpo/reward_margin"] == pytest.approx(0.3) and m["dpo/accuracy"] == 1.0


def test_sequence_logprobs_sum_and_length_normalized_mean() -> None:
    """Completion tokens at columns 1, 2 (row 0) and 1..3 (row 1): sums -3 and -6, means -1.5 and -2."""
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -1.0, -2.0, -3.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    assert sequence_logprobs(logprobs, mask, False).tolist() == [-3.0, -6.0]
    assert sequence_logprobs(logprobs, mask, True).tolist() == [-1.5, -2.0]


RECIPE = textwrap.dedent(
    """\
    name: pref
    seed: 0
    domains: [addition, reversal]
    eval: {size: 6, max_new_tokens: 6}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 4
        batch_size: 8
      sft:
        kind: sft
        init: base
        steps: 2
        batch_size: 8
      dpo:
        kind: dpo
        init: sft
        steps: 4
        batch_size: 4
        group_size: 4
        max_new_tokens: 6
        beta: 0.5
        lr: 0.01
        checkpoint_every: 2
      delta:
        kind: dpo
        init: sft
        reference: base
        pairs_from: {strong: sft, weak: base}
        loss: ipo
        length_normalized: true
        steps: 1
        batch_size: 4
        max_new_tokens: 6
      rs:
        kind: rejection_sampling
        init: sft
        sampler: dpo
        n: 3
        threshold: 0.05
        steps: 2
        batch_size: 4
        max_new_tokens: 6
    """
)


def _rows(stage: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
            for x in (stage / "metrics.jsonl").read_text().splitlines()]


def test_dpo_and_rejection_sampling_end_to_end_and_a_cut_dpo_stage_resumes_exactly(
    tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    loaded = load_recipe(tmp_path / "r.yaml")
    whole = tmp_path / "whole"
    run_recipe(loaded, whole, Console(quiet=True))

    steps = [r for r in _rows(whole / "dpo") if "dpo/pairs" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["samples/student"] == 4 * 4 for r in steps)
    paired = [r for r in steps if r["dpo/pairs"] > 0]
    assert paired, "no step of the dpo stage built a pair"
    for r in paired:
        assert 0.0 <= r["dpo/accuracy"] <= 1.0 and "dpo/reward_margin" in r
    assert paired[0]["step"] > 1 or paired[0]["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy = ref
    assert stage_output_problem(whole / "dpo") is None
    delta = [r for r in _rows(whole / "delta") if "dpo/pairs" in r]
    assert delta and delta[0]["samples/teacher"] == 8 and "dpo/strong_reward" in delta[0]
    rs = [r for r in _rows(whole / "rs") if "rejection/kept_frac" in r]
    assert len(rs) == 2 and all(0.0 <= r["rejection/kept_frac"] <= 1.0 for r in rs)
    assert all(r["samples/teacher"] == 4 * 3 for r in rs)
    assert any(r["rejection/kept_frac"] > 0 and r["sft/num_tokens"] > 0 for r in rs)  # the SFT step on kept answers
    for name in ("delta", "rs"):
        assert stage_output_problem(whole / name) is None, name

    # the same recipe, its finished parents copied, the dpo stage cut after its step-2 checkpoint
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("base", "sft"):
        shutil.copytree(whole / name, cut / name)
    real, calls = pairs_module.rollout, {"n": 0}  # one rollout per dpo step (pairs_from: policy)

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(pairs_module, "rollout", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(loaded, cut, Console(quiet=True))
    assert (cut / "dpo" / "checkpoints" / "step-0000002").is_dir() and not (cut / "dpo" / "final").exists()
    monkeypatch.setattr(pairs_module, "rollout", real)
    run_recipe(loaded, cut, Console(quiet=True))
    assert _rows(cut / "dpo") == _rows(whole / "dpo")
    for name in ("dpo", "rs"):
        final = "final/model.safetensors"
        assert (cut / name / final).read_bytes() == (whole / name / final).read_bytes(), name


def test_bundled_tulu3_recipe_runs_at_a_reduced_scale(tmp_path: Path) -> None:
    """The bundled SFT -> DPO -> RLVR recipe, with the same stages and settings but a smaller model, one or two
    steps per stage and small batches: every stage finishes and the eval stage scores all three checkpoints."""
    import yaml

    from mopd.cli_tools.bundled import bundled_recipe

    raw = yaml.safe_load(bundled_recipe("tulu3").read_text())
    raw["eval"] = {"size": 4, "max_new_tokens": 4}
    raw["stages"]["base"]["model"] = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1,
                                      "intermediate_size": 64}
    for stage in raw["stages"].values():
        if "steps" in stage:
            stage.update(steps=2, batch_size=4)
            for key in ("checkpoint_every", "warmup_steps"):
                stage.pop(key, None)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    run_recipe(load_recipe(tmp_path / "t.yaml"), tmp_path / "out", Console(quiet=True))
    scores = json.loads((tmp_path / "out" / "scores" / "final" / "eval.json").read_text())
    assert set(scores) == {"sft", "dpo", "rlvr"}
    assert "dpo/pairs" in _rows(tmp_path / "out" / "dpo")[0]
