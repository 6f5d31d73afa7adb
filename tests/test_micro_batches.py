"""Micro-batches (`micro_batch_size`): chunked = unchunked. The gradient, loss and metrics of a step split into
micro-batches equal the whole batch's (to float rounding) for every objective, GRPO with difficulty filtering and
SFT; only one micro-batch's activations are alive at a time; and the setting is not part of a stage's identity."""

from __future__ import annotations

import random
import weakref
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
import yaml

from mopd.core.schema import MOPDStage, RLVRStage
from mopd.envs import ALPHABET, DomainLike, get_domain
from mopd.learner.micro_batches import micro_batches
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.learner.supervised import supervised_loss
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe
from mopd.teachers.panel import TeacherPanel

TINY = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=48)
TOK = build_char_tokenizer(ALPHABET)
SAMPLING = dict(group_size=2, max_new_tokens=6, temperature=1.0, top_p=1.0, is_mode="truncate",
                eps_low=0.5, eps_high=2.0, adv_clip=5.0)
BASE = MOPDStage(kind="mopd", init="x", steps=1, teachers={"addition": "t_add", "reversal": "t_rev"},
                 alpha=0.0, **SAMPLING)
RLVR = RLVRStage(kind="rlvr", init="x", steps=1, **SAMPLING)
CASES: dict[str, MOPDStage | RLVRStage] = {
    "sampled": BASE,
    "sampled+grpo+surprise, T=0.7": BASE.model_copy(update={"alpha": 0.5, "surprise_alpha": 0.7, "temperature": 0.7}),
    "full_reverse_kl": BASE.model_copy(update={"objective": "full_reverse_kl"}),
    "topk+grpo": BASE.model_copy(update={"objective": "topk", "topk": 4, "alpha": 0.3}),
    "jsd": BASE.model_copy(update={"objective": "jsd"}),
    "forward_kl": BASE.model_copy(update={"objective": "forward_kl"}),
    "rlvr": RLVR.model_copy(update={"group_size": 3}),
    "rlvr+filter_solved": RLVR.model_copy(update={"group_size": 3, "filter_solved": True}),
}
DOMAINS: dict[str, DomainLike] = {n: get_domain(n) for n in ("addition", "reversal")}


def _problems():
    rng = random.Random(0)
    return [*get_domain("addition").sample_train(rng, 4), *get_domain("reversal").sample_train(rng, 3)]


def _panel() -> TeacherPanel:
    teachers = {"t_add": build_tiny_model(TINY, len(TOK), TOK, 1), "t_rev": build_tiny_model(TINY, len(TOK), TOK, 2)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    return TeacherPanel(models=teachers, teacher_of_domain={"addition": "t_add", "reversal": "t_rev"})


@pytest.fixture
def mixed_rewards() -> dict[str, DomainLike]:
    """Rewards that give GRPO a signal and the filter something to drop (a random tiny model solves nothing):
    every row of an even-numbered problem passes, the others pass when their completion has odd length."""
    passing = {p.prompt for p in _problems()[::2]}

    class Stub:
        def verify(self, problem, completion):
            return 1.0 if problem.prompt in passing else float(len(completion) % 2)

    return {name: Stub() for name in DOMAINS}


def _policy_step(student, problems, settings: MOPDStage | RLVRStage, generator: torch.Generator,
                 panel: TeacherPanel | None, micro: int | None, domains: Mapping[str, DomainLike] = DOMAINS):
    """One policy step (rollout, then the policy loss): GRPO without a panel, the stage's distillation with one."""
    batch, rollout_metrics = rollout(student, TOK, problems, domains, settings, temperature=settings.temperature,
                                     generator=generator)
    cfg = PolicyConfig(sampling=settings, distill=None if panel is None else settings, teachers=panel)
    loss, loss_metrics = policy_loss(student, batch, cfg, temperature=settings.temperature, micro_batch_size=micro)
    return loss, {**rollout_metrics, **loss_metrics}


def _step(settings: MOPDStage | RLVRStage, panel: TeacherPanel | None, micro: int | None,
          domains: Mapping[str, DomainLike]):
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    loss, metrics = _policy_step(student, _problems(), settings, torch.Generator().manual_seed(3), panel, micro,
                                 domains)
    accumulated = not loss.requires_grad
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach()), metrics, {n: p.grad for n, p in student.named_parameters()}, accumulated


def test_micro_batch_slices_cover_every_row_once() -> None:
    assert micro_batches(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert micro_batches(7, None) == [slice(0, 7)] == micro_batches(7, 7) == micro_batches(7, 100)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batched_step_equals_the_whole_batch(
    case: str, micro: int, mixed_rewards: dict[str, DomainLike]
) -> None:
    settings = CASES[case]
    panel = None if case.startswith("rlvr") else _panel()
    loss, metrics, grads, accumulated = _step(settings, panel, None, mixed_rewards)
    m_loss, m_metrics, m_grads, m_accumulated = _step(settings, panel, micro, mixed_rewards)
    assert not accumulated and m_accumulated  # the micro-batched loss comes back detached, gradients in .grad
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 1e-4  # a real learning signal, not two zero gradients
    for name, g in grads.items():
        torch.testing.assert_close(m_grads[name], g, rtol=1e-5, atol=1e-6 * scale)
    assert m_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    assert m_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert m_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_supervised_micro_batches_equal_the_whole_batch() -> None:
    grads = []
    for micro in (None, 2):
        model = build_tiny_model(TINY, len(TOK), TOK, 0)
        loss, metrics = supervised_loss(model, TOK, _problems(), loss_on_prompt=False, micro_batch_size=micro)
        assert loss.requires_grad == (micro is None)
        if loss.requires_grad:
            loss.backward()
        grads.append(({n: p.grad for n, p in model.named_parameters()}, float(loss.detach()), metrics))
    (g, loss, metrics), (mg, m_loss, m_metrics) = grads
    for name in g:
        torch.testing.assert_close(mg[name], g[name], rtol=0, atol=1e-6)
    assert m_loss == pytest.approx(loss, rel=1e-6) and m_metrics["sft/num_tokens"] == metrics["sft/num_tokens"]


def _peak_saved_bytes(fn) -> int:
    """Peak bytes of autograd-saved tensors alive at once while `fn` runs (each saved tensor is wrapped, and the
    wrapper's finalizer counts it freed when the graph that holds it goes)."""
    live, peak = [0], [0]

    def pack(t: torch.Tensor):
        box = [t]
        size = t.numel() * t.element_size()
        live[0] += size
        peak[0] = max(peak[0], live[0])
        holder = type("Saved", (), {})()
        holder.box = box
        weakref.finalize(holder, lambda: live.__setitem__(0, live[0] - size))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.box[0]):
        fn()
    return peak[0]


def test_micro_batches_bound_the_activations_alive_at_once() -> None:
    panel = _panel()
    settings = CASES["full_reverse_kl"]

    def run(micro):
        def go():
            loss, _ = _policy_step(build_tiny_model(TINY, len(TOK), TOK, 0), _problems() * 4, settings,
                                   torch.Generator().manual_seed(3), panel, micro)
            if loss.requires_grad:
                loss.backward()
        return _peak_saved_bytes(go)

    whole, quarter = run(None), run(14)  # 56 rollouts: 4 micro-batches of 14
    assert quarter < 0.35 * whole, (quarter, whole)


def test_micro_batch_size_is_not_part_of_a_stage_identity(mini_recipe: Path, tmp_path: Path) -> None:
    before = stage_identities(load_recipe(mini_recipe))
    data = yaml.safe_load(mini_recipe.read_text())
    for stage in data["stages"].values():
        if "steps" in stage:
            stage["micro_batch_size"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert stage_identities(load_recipe(path)) == before


def test_a_recipe_with_micro_batches_trains_like_one_without(mini_recipe: Path, tmp_path: Path) -> None:
    """End to end through the stage driver (`stages/driver.py` steps on gradients a loss function already
    accumulated): every stage of the miniature recipe logs the same losses and gradient norms, step by step."""
    import json

    from mopd.execution.runner import run_recipe

    data = yaml.safe_load(mini_recipe.read_text())
    for stage in data["stages"].values():
        stage["micro_batch_size"] = 5  # does not divide any batch: every step has a short last micro-batch
    micro_recipe = tmp_path / "micro.yaml"
    micro_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run_recipe(load_recipe(mini_recipe), tmp_path / "whole")
    run_recipe(load_recipe(micro_recipe), tmp_path / "micro")
    for stage in data["stages"]:
        whole, micro = ([json.loads(x) for x in (tmp_path / run / stage / "metrics.jsonl").read_text().splitlines()]
                        for run in ("whole", "micro"))
        trained = [r for r in whole if "loss" in r]
        assert trained and len(whole) == len(micro)
        for a, b in zip(whole, micro, strict=True):
            for key in ("loss", "grad_norm"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (stage, a["step"], key)
