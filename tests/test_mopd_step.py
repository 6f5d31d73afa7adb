"""MOPD step wiring on a tiny model: surprise reweighting, per-teacher teacher NLL, difficulty filtering."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
import torch

from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner import objective_table
from mopd.learner.losses import policy_gradient_loss
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.teachers.panel import TeacherPanel

from .rounding import gamma, two_path_logprob_tol

TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
OBJECTIVES = ["sampled", "topk", "full_reverse_kl", "forward_kl", "jsd"]
TOK = build_char_tokenizer(ALPHABET)
DOMAINS = {n: get_domain(n) for n in ("addition", "reversal")}


def _setup(group_size: int = 2):
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    teachers = {"t_add": build_tiny_model(TINY, len(TOK), TOK, 1), "t_rev": build_tiny_model(TINY, len(TOK), TOK, 2)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"addition": "t_add", "reversal": "t_rev"})
    rng = random.Random(0)
    problems = [*get_domain("addition").sample_train(rng, 2), *get_domain("reversal").sample_train(rng, 1)]
    settings = MOPDStage(kind="mopd", init="x", steps=1, teachers={"addition": "t_add", "reversal": "t_rev"},
                         group_size=group_size, max_new_tokens=5, temperature=1.0, top_p=1.0,
                         is_mode="truncate", eps_low=0.5, eps_high=2.0, adv_clip=5.0, alpha=0.0)
    return student, panel, problems, settings


def _policy_step(student, problems, settings: MOPDStage, generator: torch.Generator, panel: TeacherPanel,
                 domains: Mapping = DOMAINS):
    """One MOPD policy step: rollout (sample + reward), then the policy loss; metrics of both phases."""
    batch, rollout_metrics = rollout(student, TOK, problems, domains, settings, temperature=settings.temperature,
                                     generator=generator)
    loss, loss_metrics = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                                     temperature=settings.temperature)
    return loss, {**rollout_metrics, **loss_metrics}


def _capture_pg(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def spy(logprobs_B_T, sampler_logprobs_B_T, advantages_B_T, mask_B_T, **kw):
        calls.append({"logprobs": logprobs_B_T.detach(), "sampler": sampler_logprobs_B_T, "adv": advantages_B_T,
                      "mask": mask_B_T, "kw": kw})
        return policy_gradient_loss(logprobs_B_T, sampler_logprobs_B_T, advantages_B_T, mask_B_T, **kw)

    monkeypatch.setattr(objective_table, "policy_gradient_loss", spy)
    return calls


def test_surprise_weights_hand_example() -> None:
    """w_t = 1 + a (1 - pi_S(y_t)), multiplied into the advantage before the PG loss (rho = 1 here)."""
    logprobs = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    adv, mask = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2)
    w = objective_table.surprise_weights(logprobs, 0.5)
    torch.testing.assert_close(w, torch.tensor([[1.25, 1.375]]))
    loss, _ = policy_gradient_loss(logprobs, logprobs.detach(), adv * w, mask)
    # -(1.25 * 1 + 1.375 * (-2)) / 2 = 0.75, against -(1 - 2) / 2 = 0.5 unweighted
    assert float(loss.detach()) == pytest.approx(0.75)
    assert float(policy_gradient_loss(logprobs, logprobs.detach(), adv, mask)[0].detach()) == pytest.approx(0.5)


def test_surprise_alpha_scales_mopd_advantages_exactly(monkeypatch) -> None:
    student, panel, problems, settings = _setup()
    calls = _capture_pg(monkeypatch)
    loss0, m0 = _policy_step(student, problems, settings, torch.Generator().manual_seed(3), panel)
    a = 0.7
    loss_a, m_a = _policy_step(student, problems, settings.model_copy(update={"surprise_alpha": a}),
                               torch.Generator().manual_seed(3), panel)
    plain, weighted = calls
    torch.testing.assert_close(plain["logprobs"], weighted["logprobs"])  # the same rollouts
    w = 1 + a * (1 - plain["logprobs"].exp())
    torch.testing.assert_close(weighted["adv"], plain["adv"] * w)
    mask = plain["mask"]
    assert m_a["surprise/weight_mean"] == pytest.approx(float((w * mask).sum() / mask.sum()), rel=1e-6)
    assert "surprise/weight_mean" not in m0
    expected, _ = policy_gradient_loss(weighted["logprobs"], weighted["sampler"], plain["adv"] * w, mask,
                                       **weighted["kw"])
    assert float(loss_a.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(loss_a.detach()) != pytest.approx(float(loss0.detach()), rel=1e-3)


@torch.no_grad()
def _expected_teacher_nll(student, panel, problems, settings) -> tuple[dict[str, float], float]:
    """Independent recomputation: the same rollouts, each teacher run on its own rows; and the rounding bound of
    a logprob between this forward and the panel's (tests/rounding.py: other shapes, other kernels)."""
    rows = [p for p in problems for _ in range(settings.group_size)]
    batch = sample(student, TOK, [p.prompt for p in rows], max_new_tokens=settings.max_new_tokens,
                   generator=torch.Generator().manual_seed(5))
    out, tol = {}, 0.0
    for name, teacher in panel.models.items():
        sel = torch.tensor([panel.teacher_of_domain[p.domain] == name for p in rows])
        ids, attn = batch.input_ids_B_T[sel], batch.attention_mask_B_T[sel]
        logits = sequence_logits(teacher, ids, attn)
        lp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        m = batch.completion_mask_B_T[sel][:, 1:]
        out[name] = float((-lp * m).sum() / m.sum())
        tol = max(tol, two_path_logprob_tol(TINY, logits))
    return out, tol


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_teacher_nll_per_teacher_for_every_objective(objective: str) -> None:
    student, panel, problems, settings = _setup()
    expected, tol = _expected_teacher_nll(student, panel, problems, settings)
    _, metrics = _policy_step(student, problems, settings.model_copy(update={"objective": objective, "topk": 4}),
                              torch.Generator().manual_seed(5), panel)
    for name, nll in expected.items():  # a mean of <= 6 x 5 logprobs, each within tol; both means round in float32
        assert metrics[f"mopd/teacher_nll/{name}"] == pytest.approx(nll, rel=2 * gamma(30), abs=tol)
    assert metrics["mopd/routing_share/t_add"] == pytest.approx(4 / 6)
    assert metrics["mopd/routing_share/t_rev"] == pytest.approx(2 / 6)
    assert "mopd/reverse_kl/t_add" in metrics and metrics["sampling/temperature"] == 1.0


@pytest.mark.parametrize("objective", ["sampled", "full_reverse_kl"])
def test_filter_solved_masks_exactly_the_all_pass_and_no_pass_groups(monkeypatch, objective: str) -> None:
    student, panel, problems, settings = _setup(group_size=2)
    calls = _capture_pg(monkeypatch)
    # verifier stub: group 0 all pass, group 1 mixed, group 2 none pass (partial credit is not a pass)
    rewards = iter([1.0, 1.0, 1.0, 0.5, 0.5, 0.0])

    class Stub:
        def verify(self, problem, completion):
            return next(rewards)

    stubs = {name: Stub() for name in DOMAINS}
    distill_masks: list[torch.Tensor] = []
    token_mean = objective_table.masked_mean  # the distribution step's token mean of its per-token loss

    def distill_spy(loss_B_W, mask_B_W):
        distill_masks.append(mask_B_W)
        return token_mean(loss_B_W, mask_B_W)

    monkeypatch.setattr(objective_table, "masked_mean", distill_spy)
    s = settings.model_copy(update={"filter_solved": True, "objective": objective, "alpha": 0.5})
    _, metrics = _policy_step(student, problems, s, torch.Generator().manual_seed(1), panel, stubs)
    assert metrics["filter/kept_frac"] == pytest.approx(2 / 6)
    assert metrics["filter/all_solved_frac"] == pytest.approx(2 / 6)
    assert metrics["filter/none_solved_frac"] == pytest.approx(2 / 6)
    [call] = calls  # the PG loss (sampled objective, or the GRPO term of a distillation objective)
    on_rows = (call["mask"].sum(-1) > 0).tolist()
    assert on_rows == [False, False, True, True, False, False]
    if objective != "sampled":
        assert distill_masks and (distill_masks[0].sum(-1) > 0).tolist() == on_rows


def test_filter_solved_needs_groups() -> None:
    student, panel, problems, settings = _setup(group_size=1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        _policy_step(student, problems, settings.model_copy(update={"filter_solved": True}),
                     torch.Generator().manual_seed(0), panel)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_importance_ratio_is_one_on_policy_at_any_sampling_temperature(monkeypatch, temperature: float) -> None:
    """Before any update the policy is the sampler: the PG term must see ratio 1 (no token dropped), which needs
    the tempered policy logprob, while the OPD advantage keeps the model's own (T = 1) distribution."""
    student, panel, problems, settings = _setup()
    calls = _capture_pg(monkeypatch)
    s = settings.model_copy(update={"temperature": temperature})
    batch, _ = rollout(student, TOK, problems, DOMAINS, s, temperature=temperature,
                       generator=torch.Generator().manual_seed(5))
    _, metrics = policy_loss(student, batch, PolicyConfig(sampling=s, distill=s, teachers=panel),
                             temperature=temperature)
    (pg,) = calls
    mask = pg["mask"].bool()
    # the learner's tempered logprob (full forward) and the sampler's (KV cache): float32 rounding of two kernel
    # paths, of logits / T (tests/rounding.py); the untempered logprob would be off by O(0.1)
    with torch.no_grad():
        logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T) / temperature
    torch.testing.assert_close(pg["logprobs"][mask], pg["sampler"][mask], atol=two_path_logprob_tol(TINY, logits),
                               rtol=0)
    assert metrics["is/dropped_frac"] == 0.0
