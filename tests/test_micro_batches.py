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

from .rounding import decoder_path_terms, gamma, two_path_grad_tol, two_path_logprob_tol

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
    # Micro-batches of 1 or 4 rows run other kernels than the whole batch: float32 rounding of two paths
    # (tests/rounding.py), over windows of <= 22 positions (prompts <= 15 characters, 6 new tokens) and the
    # step's <= 21 rows x 6 tokens. Loss and metrics are token means of terms of magnitude <= 10 (|advantage| <=
    # adv_clip 5 times an importance weight <= 2; token NLLs and KLs of 47 tokens). A micro-batch weighted
    # wrongly, a row missed or counted twice moves them by O(1/21) of their scale.
    rows = len(_problems()) * settings.group_size
    tol = two_path_grad_tol(TINY, 22, len(TOK), rows * settings.max_new_tokens, grads)
    for name, g in grads.items():
        torch.testing.assert_close(m_grads[name], g, rtol=0, atol=tol)
    if getattr(settings, "objective", None) == "topk":
        _assert_teacher_topk_is_determined(settings, panel, mixed_rewards)
    term_tol = 2 * gamma(decoder_path_terms(TINY, 22, len(TOK)) + rows * settings.max_new_tokens) * 10
    assert m_loss == pytest.approx(loss, rel=0, abs=term_tol)
    assert m_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert m_metrics[key] == pytest.approx(value, rel=0, abs=term_tol), key


def _assert_teacher_topk_is_determined(settings, panel, domains) -> None:
    """The top-k objective reads the teachers' k most likely tokens, which micro-batches score with other kernels:
    the same set either way only where the k-th and (k+1)-th logprobs are further apart than the two paths'
    rounding (tests/rounding.py) can close, at every completion position of this step's rollouts."""
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    batch, _ = rollout(student, TOK, _problems(), domains, settings, temperature=settings.temperature,
                       generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = panel.full_logits(batch, panel.route(batch))
    top = full.log_softmax(-1).topk(settings.topk + 1, -1).values
    gaps = (top[..., -2] - top[..., -1])[batch.completion_mask_B_T > 0]
    assert float(gaps.min()) > two_path_logprob_tol(TINY, full)


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
    # float32 rounding of two kernel paths (tests/rounding.py): rows of <= 22 tokens (prompt and answer), token
    # NLLs (<= 10 here) averaged over the 7 rows' answer tokens
    tokens = int(metrics["sft/num_tokens"])
    tol = two_path_grad_tol(TINY, 22, len(TOK), tokens, g)
    for name in g:
        torch.testing.assert_close(mg[name], g[name], rtol=0, atol=tol)
    assert m_loss == pytest.approx(loss, rel=0, abs=2 * gamma(decoder_path_terms(TINY, 22, len(TOK)) + tokens) * 10)
    assert m_metrics["sft/num_tokens"] == metrics["sft/num_tokens"]


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
    accumulated): every stage of the miniature recipe, with micro-batches, takes the first step the whole batch
    takes: the same loss and gradient norm, to float rounding.

    The first step only, each from the same weights: AdamW's first update is about lr * sign(g), so where a
    gradient entry is near zero the two runs' rounding (different row counts, different kernels) moves a weight
    by a whole step, and nothing after it (later steps, their rollouts, the stages that start from it) is
    determined. So each stage of the micro-batched run starts from the whole run's checkpoints, its `init` and
    `teachers` given as their paths."""
    import json

    from mopd.execution.runner import run_recipe

    run_recipe(load_recipe(mini_recipe), tmp_path / "whole")
    data = yaml.safe_load(mini_recipe.read_text())
    for stage in data["stages"].values():
        stage["micro_batch_size"] = 5  # does not divide any batch: every step has a short last micro-batch
        if "init" in stage:
            stage["init"] = str(tmp_path / "whole" / stage["init"] / "final")
        if "teachers" in stage:
            stage["teachers"] = {d: str(tmp_path / "whole" / t / "final") for d, t in stage["teachers"].items()}
    micro_recipe = tmp_path / "micro.yaml"
    micro_recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    run_recipe(load_recipe(micro_recipe), tmp_path / "micro")
    # Float32 rounding of the same step by two kernel paths (tests/rounding.py): each per-token term goes through
    # N = `decoder_path_terms` accumulated terms forward and as many backward, and the loss and every gradient
    # entry sum over the step's tokens (<= rows x 32: no prompt here exceeds 15 characters, no answer or
    # completion 12 tokens); the per-token terms are at most 10 in magnitude (token NLLs of a 47-token
    # vocabulary; |advantage| <= adv_clip 5 times an importance weight <= 2). A micro-batch weighted wrongly, or
    # one missed, moves these by O(10%).
    cfg = TinyModelConfig(**data["stages"]["base"]["model"])
    for stage in data["stages"]:
        whole, micro = ([json.loads(x) for x in (tmp_path / run / stage / "metrics.jsonl").read_text().splitlines()]
                        for run in ("whole", "micro"))
        a, b = (next(r for r in rows if "loss" in r) for rows in (whole, micro))
        assert a["step"] == b["step"] == 1 and "grad_norm" in a
        tokens = data["stages"][stage]["batch_size"] * data["stages"][stage].get("group_size", 1) * 32
        bound = 2 * gamma(2 * decoder_path_terms(cfg, 32, len(TOK)) + tokens)
        assert b["loss"] == pytest.approx(a["loss"], rel=0, abs=bound * 10), stage
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=bound, abs=0), stage
