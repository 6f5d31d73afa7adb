"""MOPD with reward-only domains (Nemotron 3 Ultra): domains of a mopd stage without a teacher are trained by GRPO
on their reward in the same step; the rows with a teacher keep exactly their MOPD advantage."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from mopd.core.errors import RecipeError
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner import objective_table
from mopd.learner.advantages import grpo_advantages
from mopd.learner.losses import policy_gradient_loss
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import load_recipe
from mopd.sampling.sampler import sample
from mopd.teachers.panel import TeacherPanel

TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
TOK = build_char_tokenizer(ALPHABET)


class CountingPanel(TeacherPanel):
    """The panel, recording which rows' domains it was asked to score."""

    def sampled_logprobs(self, batch, names_B):
        self.asked = [*getattr(self, "asked", []), list(batch.domains)]
        return super().sampled_logprobs(batch, names_B)


def _batch(group_size: int = 2):
    """A rewarded batch: 2 addition prompts (teacher rows) and 2 reversal prompts (reward-only), hand rewards."""
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    rng = random.Random(0)
    problems = [*get_domain("addition").sample_train(rng, 2), *get_domain("reversal").sample_train(rng, 2)]
    rows = [p for p in problems for _ in range(group_size)]
    batch = sample(student, TOK, [p.prompt for p in rows], max_new_tokens=4, generator=torch.Generator().manual_seed(1),
                   domains=[p.domain for p in rows], group_ids=[i // group_size for i in range(len(rows))])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.25, 0.0, 0.75])
    return student, batch.with_rewards(rewards)


def _settings(alpha: float) -> MOPDStage:
    return MOPDStage(kind="mopd", init="x", steps=1, teachers={"addition": "t_add"}, group_size=2,
                     max_new_tokens=4, alpha=alpha, adv_clip=None)


def _capture(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def spy(logprobs_B_T, sampler_logprobs_B_T, advantages_B_T, mask_B_T, **kw):
        calls.append({"adv": advantages_B_T.detach().clone(), "mask": mask_B_T, "kw": kw})
        return policy_gradient_loss(logprobs_B_T, sampler_logprobs_B_T, advantages_B_T, mask_B_T, **kw)

    monkeypatch.setattr(objective_table, "policy_gradient_loss", spy)
    return calls


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_reward_only_rows_get_grpo_and_teacher_rows_are_unchanged(monkeypatch, alpha: float) -> None:
    student, batch = _batch()
    teacher = build_tiny_model(TINY, len(TOK), TOK, 7).eval().requires_grad_(False)
    panel = CountingPanel(models={"t_add": teacher}, teacher_of_domain={"addition": "t_add"})
    calls = _capture(monkeypatch)
    s = _settings(alpha)
    _, metrics = policy_loss(student, batch, PolicyConfig(sampling=s, distill=s, teachers=panel,
                                                          reward_only=frozenset({"reversal"})), temperature=1.0)
    adv = calls[0]["adv"]
    mask = batch.completion_mask_B_T
    # reward-only rows (4..7): exactly GRPO of their groups, weight 1, no teacher term
    grpo_B_T, _, _ = grpo_advantages(batch.rewards_B, batch.group_ids_B, mask)
    torch.testing.assert_close(adv[4:], grpo_B_T[4:])
    # group (1.0, 0.25): mean 0.625, population std 0.375 -> +-1 (up to eps); group (0.0, 0.75) the same
    assert adv[4][mask[4] > 0].tolist() == pytest.approx([1.0] * int(mask[4].sum()), abs=1e-5)
    assert adv[5][mask[5] > 0].tolist() == pytest.approx([-1.0] * int(mask[5].sum()), abs=1e-5)
    # the teacher scored only its own rows
    assert panel.asked == [["addition"] * 4]
    # teacher rows (0..3): the MOPD advantage of the same rows in a step without reward-only rows
    teacher_rows = batch.select(torch.arange(4))
    policy_loss(student, teacher_rows, PolicyConfig(sampling=s, distill=s, teachers=panel), temperature=1.0)
    torch.testing.assert_close(adv[:4, -calls[1]["adv"].shape[1]:], calls[1]["adv"])
    # ... which is -(log pi_S - log pi_T) (+ alpha * GRPO) per token
    lp_t = panel.sampled_logprobs(teacher_rows, ["t_add"] * 4)
    lp_s = teacher_rows.sampler_logprobs_B_T
    expected = (lp_t - lp_s) * teacher_rows.completion_mask_B_T + alpha * grpo_B_T[:4, -lp_t.shape[1]:]
    torch.testing.assert_close(adv[:4, -lp_t.shape[1]:], expected, atol=1e-5, rtol=1e-5)
    assert metrics["reward_only/share"] == pytest.approx(0.5)
    assert metrics["mopd/routing_share/t_add"] == 1.0  # over the rows with a teacher


def _recipe(tmp_path: Path, mini_recipe: Path, **student) -> Path:
    d = yaml.safe_load(mini_recipe.read_text())
    del d["stages"]["student"]["teachers"]["reversal"]
    d["stages"]["student"].update(student)
    path = tmp_path / "reward_only.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_a_domain_without_teacher_loads_as_reward_only(tmp_path: Path, mini_recipe: Path) -> None:
    loaded = load_recipe(_recipe(tmp_path, mini_recipe))
    assert "reversal" not in loaded.recipe.stages["student"].teachers


@pytest.mark.parametrize(("update", "says"), [
    ({"group_size": 1, "alpha": 0.0}, "'reversal' has no teacher, so it is trained by GRPO on its reward"),
    ({"objective": "topk"}, "reward-only domains need `objective: sampled` (got 'topk')"),
    ({"teachers": {}}, "none of the stage's domains has a teacher (use `kind: rlvr`)"),
])
def test_reward_only_settings_refused_in_one_line(tmp_path: Path, mini_recipe: Path, update, says) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, mini_recipe, **update))
    assert says in str(e.value) and "\n" not in str(e.value)


RECIPE = """\
name: reward_only
seed: 0
domains: [addition, reversal]
eval: {size: 4, max_new_tokens: 4}
stages:
  base:
    kind: pretrain
    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
    steps: 2
    batch_size: 4
  student:
    kind: mopd
    init: base
    teachers: {addition: base}
    steps: 2
    batch_size: 4
    group_size: 2
    max_new_tokens: 4
    alpha: 0.5
"""


def test_a_mopd_stage_with_a_reward_only_domain_runs(tmp_path: Path) -> None:
    """Through the runner: the preflight measures only the teacher's domains, every step logs the reward-only
    share, and the stage finishes with a checkpoint."""
    import json

    from rich.console import Console

    from mopd.execution.runner import run_recipe
    from mopd.models.integrity import stage_output_problem

    (tmp_path / "r.yaml").write_text(RECIPE)
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", Console(quiet=True))
    stage = tmp_path / "out" / "student"
    assert stage_output_problem(stage) is None
    assert json.loads((stage / "preflight.json").read_text())["teachers"]["base"]["domains"] == ["addition"]
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_only/share"] for r in rows if "loss" in r] == [0.5, 0.5]
