"""The ppo stage (issue 20): GAE against a hand-computed trajectory, the clipped policy objective and the value
loss against exact values, and a miniature PPO stage (critic started from a reward model) run end to end, cut
after a checkpoint and resumed to the uninterrupted run's metrics, policy and critic."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForTokenClassification

from mopd.core.schema import TinyModelConfig
from mopd.execution.runner import run_recipe
from mopd.learner.ppo import clipped_policy_loss, clipped_value_loss, gae, token_rewards, whiten
from mopd.models.integrity import stage_output_problem
from mopd.recipe.load import load_recipe
from mopd.recipe.tokenizer import scratch_tokenizer
from mopd.stages import ppo as ppo_module

from .rounding import decoder_path_terms, gamma, two_path_grad_tol


def test_token_rewards_by_hand() -> None:
    """kl = old - ref = (0.5, -1, 0) on the completion; r = -0.1 * kl, plus the reward 1 at the last token."""
    r, m = token_rewards(torch.tensor([1.0]), torch.tensor([[0.0, -1.0, -2.0, -0.5]]),
                         torch.tensor([[0.0, -1.5, -1.0, -0.5]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]]), 0.1)
    assert r.tolist()[0] == pytest.approx([0.0, -0.05, 0.1, 1.0])
    assert m["ppo/kl"] == pytest.approx(-0.5 / 3)


def test_gae_against_a_hand_computed_trajectory() -> None:
    """gamma 0.9, lam 0.5. Row 0, completion at columns 1-3, r = (0.1, -0.2, 1.0), V = (0.5, 0.4, 0.8):
    t3: delta = 1.0 - 0.8 = 0.2, A = 0.2
    t2: delta = -0.2 + 0.9 * 0.8 - 0.4 = 0.12, A = 0.12 + 0.45 * 0.2 = 0.21
    t1: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04, A = -0.04 + 0.45 * 0.21 = 0.0545
    returns A + V = (0.5545, 0.61, 1.0). Row 1, one completion token then padding whose values (9) must not
    leak: A = 0.7 - 0.3 = 0.4, return 0.7."""
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0], [0.0, 0.7, 0.0, 0.0]])
    values = torch.tensor([[0.0, 0.5, 0.4, 0.8], [0.0, 0.3, 9.0, 9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.0, 0.0545, 0.21, 0.2])
    assert adv.tolist()[1] == pytest.approx([0.0, 0.4, 0.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.0, 0.5545, 0.61, 1.0])
    assert ret.tolist()[1] == pytest.approx([0.0, 0.7, 0.0, 0.0])
    # gamma = lam = 1: A_t = (sum of the rewards from t) - V_t (Monte Carlo)
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv1.tolist()[0] == pytest.approx([0.0, 0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.8])


def test_whiten_by_hand() -> None:
    """Values 1, 2, 3 on the mask: mean 2, population std sqrt(2/3) = 0.8164966 -> -1.2247449, 0, 1.2247449."""
    out = whiten(torch.tensor([[9.0, 1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    assert out.tolist()[0] == pytest.approx([0.0, -1.2247449, 0.0, 1.2247449], abs=1e-6)


def test_clipped_policy_objective_by_hand() -> None:
    """clip 0.2, ratios (1.5, 0.5, 1.1), advantages (1, 1, -2):
    t1: min(1.5, 1.2) = 1.2; t2: min(0.5, 0.8) = 0.5; t3: min(-2.2, -2.2) = -2.2
    loss = -(1.2 + 0.5 - 2.2) / 3 = 0.1666667; clip fraction 2/3 (t1, t2).
    Gradient wrt log pi: t1 is clipped (0); t2: -0.5 * 1 / 3 = -0.1666667; t3: -1.1 * -2 / 3 = 0.7333333."""
    old = torch.log(torch.tensor([[0.2, 0.4, 0.5]]))
    new = (old + torch.log(torch.tensor([[1.5, 0.5, 1.1]]))).requires_grad_(True)
    loss, m = clipped_policy_loss(new, old, torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3), clip=0.2)
    assert float(loss.detach()) == pytest.approx(0.5 / 3, abs=1e-6)
    assert m["ppo/clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, 2.2 / 3], abs=1e-6)


def test_clipped_value_loss_by_hand() -> None:
    """V = (1.0, 0.55), V_old = (0.5, 0.0), R = (0.6, 0.5), value clip 0.2:
    t1: (1.0 - 0.6)^2 = 0.16 vs (0.5 + 0.2 - 0.6)^2 = 0.01 -> 0.16
    t2: (0.55 - 0.5)^2 = 0.0025 vs (0.0 + 0.2 - 0.5)^2 = 0.09 -> 0.09
    loss = 0.5 * (0.16 + 0.09) / 2 = 0.0625; unclipped 0.5 * (0.16 + 0.0025) / 2 = 0.040625."""
    v, v_old, ret, mask = (torch.tensor([[1.0, 0.55]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.6, 0.5]]),
                           torch.ones(1, 2))
    assert float(clipped_value_loss(v, v_old, ret, mask, 0.2)[0]) == pytest.approx(0.0625)
    assert float(clipped_value_loss(v, v_old, ret, mask, None)[0]) == pytest.approx(0.040625)


RECIPE = textwrap.dedent(
    """\
    name: ppo
    seed: 0
    domains: [addition]
    eval: {size: 4, max_new_tokens: 5}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 4
        batch_size: 8
      rm:
        kind: reward_model
        init: base
        steps: 1
        batch_size: 4
        group_size: 2
        max_new_tokens: 5
        eval_pairs: 4
      ppo:
        kind: ppo
        init: base
        critic: rm
        steps: 4
        epochs: 2
        batch_size: 4
        group_size: 2
        max_new_tokens: 5
        lr: 0.01
        checkpoint_every: 2
    """
)


def _rows(stage: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}
            for x in (stage / "metrics.jsonl").read_text().splitlines()]


def test_ppo_stage_end_to_end_and_a_cut_stage_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    loaded = load_recipe(tmp_path / "r.yaml")
    whole = tmp_path / "whole"
    first_critic_grads: dict[str, dict[str, torch.Tensor]] = {}  # run -> the critic's gradient of its first step
    run_of = {"now": "whole"}
    real_update = ppo_module.update_critic

    def recording_update(critic, loss, grad_clip):
        if run_of["now"] not in first_critic_grads:
            if loss.requires_grad:  # the whole batch's loss still has its graph; micro-batches left .grad
                loss.backward(retain_graph=True)
            first_critic_grads[run_of["now"]] = {n: p.grad.clone() for n, p in critic["model"].named_parameters()
                                                if p.grad is not None}
            if loss.requires_grad:
                critic["opt"].zero_grad(set_to_none=True)
        return real_update(critic, loss, grad_clip)

    monkeypatch.setattr(ppo_module, "update_critic", recording_update)
    run_recipe(loaded, whole, Console(quiet=True))
    assert stage_output_problem(whole / "ppo") is None
    steps = [r for r in _rows(whole / "ppo") if "ppo/policy_loss" in r]
    assert [r["samples/student"] for r in steps] == [8, 0, 8, 0]  # one rollout per 2 epochs
    assert all("ppo/value_loss" in r for r in steps)
    assert ["ppo/kl" in r for r in steps] == [True, False, True, False]  # the rollout's KL, logged when sampled
    assert steps[0]["ppo/clip_frac"] == 0.0 and steps[0]["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    critic = AutoModelForTokenClassification.from_pretrained(whole / "ppo" / "critic")
    assert critic.config.num_labels == 1 and not (whole / "ppo" / "critic_checkpoints").exists()

    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("base", "rm"):
        shutil.copytree(whole / name, cut / name)
    real, calls = ppo_module.rollout, {"n": 0}

    def crash_on_second_rollout(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_module, "rollout", crash_on_second_rollout)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(loaded, cut, Console(quiet=True))
    assert (cut / "ppo" / "critic_checkpoints" / "step-0000002").is_dir()
    monkeypatch.setattr(ppo_module, "rollout", real)
    run_recipe(loaded, cut, Console(quiet=True))
    assert _rows(cut / "ppo") == _rows(whole / "ppo")
    for part in ("final", "critic"):
        f = f"{part}/model.safetensors"
        assert (cut / "ppo" / f).read_bytes() == (whole / "ppo" / f).read_bytes(), part

    # micro-batches of 3 rows (8 rows a step: parts of 3, 3 and 2): the whole batch's first step, up to float
    # rounding, for the policy and the critic. The first step only: AdamW's first update is about lr * sign(g), so
    # where a gradient entry is near zero the two runs' rounding moves a weight by a whole step (lr = 0.01 here),
    # and the later steps, rollouts and final weights are not determined.
    (tmp_path / "micro.yaml").write_text(RECIPE.replace("    checkpoint_every: 2\n",
                                                        "    checkpoint_every: 2\n    micro_batch_size: 3\n"))
    micro = tmp_path / "micro"
    micro.mkdir()
    for name in ("base", "rm"):
        shutil.copytree(whole / name, micro / name)
    micro_recipe = load_recipe(tmp_path / "micro.yaml")
    assert micro_recipe.recipe.stages["ppo"].micro_batch_size == 3
    run_of["now"] = "micro"
    run_recipe(micro_recipe, micro, Console(quiet=True))
    # Float32 rounding of two kernel paths (tests/rounding.py): windows of <= 15 positions (prompts <= 8
    # characters, 5 new tokens), 8 rows x 5 tokens; per-token loss terms <= 10 (whitened advantages of 40 tokens
    # are <= sqrt(40) in magnitude, times a ratio clipped to 1.2; squared value errors of returns in [-1, 2]).
    # A micro-batch weighted wrongly, or a row missed, moves these by O(1/8) of their scale.
    cfg = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)  # RECIPE's base
    vocab = len(scratch_tokenizer(loaded.recipe, loaded.recipe.tokenizer, loaded.domains))
    term_tol = 2 * gamma(decoder_path_terms(cfg, 15, vocab) + 40) * 10
    grad_rel = 2 * gamma(2 * decoder_path_terms(cfg, 15, vocab) + 40)
    a, b = (_rows(d / "ppo")[0] for d in (micro, whole))
    assert a.keys() == b.keys() and a["step"] == 1 and "grad_norm" in a
    for k in a:
        if isinstance(a[k], float):
            tol = dict(rel=grad_rel, abs=0) if k == "grad_norm" else dict(rel=0, abs=term_tol)
            assert a[k] == pytest.approx(b[k], **tol), k
    want = first_critic_grads["whole"]
    assert first_critic_grads["micro"].keys() == want.keys() and any(float(g.abs().max()) > 0 for g in want.values())
    tol = two_path_grad_tol(cfg, 15, vocab, 40, want)
    for name, g in want.items():
        torch.testing.assert_close(first_critic_grads["micro"][name], g, rtol=0, atol=tol, msg=name)
