"""The scoring shortcuts of issue 5 change no number: the teacher panel's (a teacher's own rows without shared
padding, logits for the completion only, no scatter for a single teacher) give what scoring every row over the
whole batch gives, and policy_loss on the completion window gives the full-sequence loss and gradient."""

from __future__ import annotations

import random

import pytest
import torch

from mopd.core.logprobs import token_logprobs
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.objectives import full_reverse_kl_loss
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.teachers.panel import TeacherPanel

from .rounding import decoder_path_terms, gamma, head_logprob_tol, two_path_grad_tol, two_path_logprob_tol

CFG = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)


def _setup():
    tok = build_char_tokenizer(ALPHABET)
    student, *teachers = (build_tiny_model(CFG, len(tok), tok, seed=s).eval() for s in range(3))
    # short prompts go to teacher "a", long ones to "b": b's rows share no padding with a's longest
    prompts = ["1+2=", "rev:abcdefghijkl=", "3+4=", "sort:zyxwvutsrqp="] * 3
    domains = ["short", "long"] * 6
    batch = sample(student, tok, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0),
                   domains=domains)
    return batch, {"a": teachers[0], "b": teachers[1]}


def _reference(batch, models, names):
    """Every row scored over the whole, untrimmed batch by its routed teacher: [B, T] and [B, T, V]."""
    lp = torch.zeros_like(batch.sampler_logprobs_B_T)
    full = None
    for i, name in enumerate(names):
        logits = sequence_logits(models[name], batch.input_ids_B_T[i : i + 1], batch.attention_mask_B_T[i : i + 1])
        lp[i] = token_logprobs(logits, batch.input_ids_B_T[i : i + 1])[0]
        if full is None:
            full = torch.zeros(batch.size, *logits.shape[1:])
        full[i, 1:] = logits[0, :-1]
    return lp * batch.completion_mask_B_T, full


def test_routed_scores_equal_whole_batch_scores() -> None:
    batch, models = _setup()
    panel = TeacherPanel(models=models, teacher_of_domain={"short": "a", "long": "b"})
    names = panel.route(batch)
    ref_lp, ref_full = _reference(batch, models, names)
    # one row alone against trimmed rows of a batch: float32 rounding of two kernel paths (tests/rounding.py),
    # which bounds the logits too (within half of it); a row scored by the wrong teacher, or a position off by
    # one, is off by O(0.1)
    tol = two_path_logprob_tol(CFG, ref_full)
    torch.testing.assert_close(panel.sampled_logprobs(batch, names), ref_lp, atol=tol, rtol=0)
    real = batch.attention_mask_B_T.bool()  # positions after a real token; padding columns may differ
    prev_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    torch.testing.assert_close(panel.full_logits(batch, names)[prev_real], ref_full[prev_real], atol=tol, rtol=0)


def test_single_teacher_scores_equal_whole_batch_scores() -> None:
    batch, models = _setup()
    panel = TeacherPanel(models={"a": models["a"]}, teacher_of_domain={"short": "a", "long": "a"})
    names = panel.route(batch)
    ref_lp, ref_full = _reference(batch, models, names)
    tol = two_path_logprob_tol(CFG, ref_full)  # as above
    torch.testing.assert_close(panel.sampled_logprobs(batch, names), ref_lp, atol=tol, rtol=0)
    prev_real = torch.cat([torch.zeros_like(batch.attention_mask_B_T[:, :1]), batch.attention_mask_B_T[:, :-1]], 1)
    torch.testing.assert_close(panel.full_logits(batch, names)[prev_real.bool()], ref_full[prev_real.bool()], atol=tol,
                               rtol=0)


def test_policy_loss_on_completion_window_equals_full_sequence() -> None:
    """policy_loss projects only the completion window onto the vocabulary; loss and gradient are unchanged."""
    tok = build_char_tokenizer(ALPHABET)
    student = build_tiny_model(CFG, len(tok), tok, seed=0)
    panel = TeacherPanel(models={"t": build_tiny_model(CFG, len(tok), tok, seed=1).eval()},
                         teacher_of_domain={"reversal": "t", "sorting": "t"})
    rng = random.Random(0)
    problems = [get_domain(d).sample(rng) for d in ("reversal", "sorting") * 4]
    settings = MOPDStage(kind="mopd", init="x", steps=1, teachers={"reversal": "t", "sorting": "t"}, group_size=1,
                         max_new_tokens=5, temperature=1.0, top_p=1.0, is_mode="truncate", eps_low=0.5, eps_high=2.0,
                         adv_clip=5.0, alpha=0.0, objective="full_reverse_kl")
    domains = {d: get_domain(d) for d in ("reversal", "sorting")}
    rollouts, _ = rollout(student, tok, problems, domains, settings, temperature=settings.temperature,
                          generator=torch.Generator().manual_seed(0))
    loss, _ = policy_loss(student, rollouts, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                          temperature=settings.temperature)
    batch = sample(student, tok, [p.prompt for p in problems], max_new_tokens=5,
                   generator=torch.Generator().manual_seed(0), domains=[p.domain for p in problems])
    logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T)
    names = panel.route(batch)
    mask = batch.completion_mask_B_T
    teacher_logits = panel.full_logits(batch, names)
    ref, _ = full_reverse_kl_loss(logits[:, :-1], teacher_logits[:, 1:], mask[:, 1:])
    params = list(student.parameters())
    grads = dict(zip(map(str, range(len(params))), torch.autograd.grad(ref, params), strict=True))
    # The window's and the whole sequence's projections are GEMMs of other shapes (other kernels, by CPU): float32
    # rounding of two paths (tests/rounding.py). The loss is a token mean of KL terms, each within 4 gamma(N) S of
    # exact per path (two log-softmaxes). A position off by one moves them by O(1/8) of their scale.
    tokens, T, V = int(mask.sum()), logits.shape[1], logits.shape[-1]
    tol = two_path_grad_tol(CFG, T, V, tokens, grads)
    for a, (name, b) in zip(torch.autograd.grad(loss, params), grads.items(), strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=lambda m, n=name: f"parameter {n}: {m}")
    S = max(float(logits.detach().abs().max()), float(teacher_logits.abs().max()))
    torch.testing.assert_close(loss, ref, atol=2 * gamma(decoder_path_terms(CFG, T, V) + tokens) * 4 * S, rtol=0)


def test_completion_window_of_full_logits_and_topk_equals_the_whole_sequence() -> None:
    """The full-distribution objectives ask the panel for the completion window only; it is the window of what
    every position would give, for routed (trimmed) rows and for one teacher over the whole batch."""
    batch, models = _setup()
    first = int(batch.completion_mask_B_T.any(0).long().argmax())
    window = batch.input_ids_B_T.shape[1] - first
    for routing in ({"short": "a", "long": "b"}, {"short": "a", "long": "a"}):
        panel = TeacherPanel(models=models, teacher_of_domain=routing)
        names = panel.route(batch)
        whole = panel.full_logits(batch, names)
        part = panel.full_logits(batch, names, window)
        assert part.shape == (batch.size, window, whole.shape[-1])
        # each teacher's decoder runs on the same rows either way; only the head's GEMM (of fewer positions:
        # another kernel, by CPU) and the log-softmax differ: twice `head_logprob_tol` (~1e-5 here); a window
        # shifted by a position is off by O(0.1)
        tol = 2 * max(head_logprob_tol(models[n], batch.input_ids_B_T, batch.attention_mask_B_T) for n in set(names))
        torch.testing.assert_close(part, whole[:, -window:], atol=tol, rtol=0)
        top_lp, top_ids, sampled = panel.topk(batch, names, 3)
        w_lp, w_ids, w_sampled = panel.topk(batch, names, 3, window)
        torch.testing.assert_close(w_lp, top_lp[:, -window:], atol=tol, rtol=0)
        top4 = whole[:, -window:].log_softmax(-1).topk(4, -1).values  # the top-3 and its order are determined
        decided = ((top4[..., :-1] - top4[..., 1:]) > 2 * tol).all(-1)  # where no two of the top 4 are that close
        assert decided.float().mean() > 0.9
        assert torch.equal(w_ids[decided], top_ids[:, -window:][decided])
        torch.testing.assert_close(w_sampled, sampled, atol=tol, rtol=0)  # [B, T], zero off the completion
        assert float(sampled.abs().sum()) > 0


def test_shared_prefill_runs_each_prompt_once_with_the_same_scores() -> None:
    """`share_prefill`: a teacher runs each distinct prompt of its rows once and copies its KV cache to the rows
    that share it; its sampled-token logprobs and every block of logits equal the per-row pass (float64, so the
    kernel difference is rounding at 1e-12), and its decoder saw each prompt's columns once (3 prompts of 12
    rows per teacher: 3 prompt rows, then 12 completion rows)."""
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    student, *teachers = (build_tiny_model(cfg, len(tok), tok, seed=s).double().eval() for s in range(3))
    prompts = [p for p in ("1+2=", "rev:abcdefghijkl=", "sort:zyxw=") for _ in range(4)] * 2
    batch = sample(student, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                   domains=["a"] * 12 + ["b"] * 12)
    models = {"a": teachers[0], "b": teachers[1]}
    plain = TeacherPanel(models=models, teacher_of_domain={"a": "a", "b": "b"}, logit_chunk=3)
    shared = TeacherPanel(models=models, teacher_of_domain={"a": "a", "b": "b"}, logit_chunk=3, share_prefill=True)
    names = plain.route(batch)
    seen: list[int] = []
    hook = teachers[0].get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        got = shared.sampled_logprobs(batch, names)
    finally:
        hook.remove()
    assert seen == [3, 12]
    torch.testing.assert_close(got, plain.sampled_logprobs(batch, names), rtol=1e-10, atol=1e-12)
    assert got.abs().sum() > 0
    T = batch.input_ids_B_T.shape[1]
    K = T - int(batch.completion_mask_B_T.any(0).long().argmax()) + 1
    want, have = plain.logit_blocks(batch, names, K), shared.logit_blocks(batch, names, K)
    for start, stop in ((0, 3), (3, K)):
        torch.testing.assert_close(have(start, stop), want(start, stop), rtol=1e-10, atol=1e-12)


def test_a_mopd_stage_with_teacher_shared_prefill_scores_through_it(tmp_path, mini_recipe, monkeypatch) -> None:
    """`teacher_shared_prefill: true` reaches the stage's panel: the mini recipe's student (groups of 2) scores
    its teachers through the shared prefill at every step, each step's scores are the plain panel's on that step's
    batch up to float rounding, and so is the first step's loss. The setting is outside the stage identity (same
    results, like `logit_chunk`).

    Only the first step's loss is compared between the runs: AdamW's first update is about lr * sign(g), so where
    a gradient entry is near zero, rounding moves the weight by a whole step; after it neither the weights nor
    the rollouts of the two runs are determined. The shared prefill is checked at every step on the run's own
    batches instead."""
    import dataclasses
    import json

    import yaml

    from mopd.execution.runner import run_recipe
    from mopd.recipe.identity import SETTINGS_NOT_IN_IDENTITY
    from mopd.recipe.load import load_recipe
    from mopd.teachers import panel as panel_module

    used: list[int] = []
    real = panel_module.shared_prompt_hidden

    def counting(model, ids, mask, prompt_columns, keep):
        out = real(model, ids, mask, prompt_columns, keep)
        prompts = (ids[:, :prompt_columns] * mask[:, :prompt_columns]).unique(dim=0).shape[0]
        if prompts < ids.shape[0]:  # rows share a prompt: a training step's groups (held-out transcripts do not)
            used.append(out is not None)
        return out

    monkeypatch.setattr(panel_module, "shared_prompt_hidden", counting)
    run_recipe(load_recipe(mini_recipe), tmp_path / "plain")
    assert not used
    data = yaml.safe_load(mini_recipe.read_text())
    data["stages"]["student"]["teacher_shared_prefill"] = True
    shared_recipe = tmp_path / "shared.yaml"
    shared_recipe.write_text(yaml.safe_dump(data))
    cfg = TinyModelConfig(**data["stages"]["base"]["model"])
    checked: list[tuple[float, float]] = []  # (largest difference from the plain panel, its bound), per step
    scored = panel_module.TeacherPanel.sampled_logprobs

    def against_plain(self, batch, names_B):
        got = scored(self, batch, names_B)
        if self.share_prefill:
            plain = dataclasses.replace(self, share_prefill=False)
            with torch.no_grad():  # the KV-cached prompt and the full forward: two float32 kernel paths
                tol = two_path_logprob_tol(cfg, plain.full_logits(batch, names_B))
            checked.append((float((got - scored(plain, batch, names_B)).abs().max()), tol))
        return got

    monkeypatch.setattr(panel_module.TeacherPanel, "sampled_logprobs", against_plain)
    run_recipe(load_recipe(shared_recipe), tmp_path / "shared")
    assert used and all(used)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "student" / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert len(losses("shared")) == 4 and len(checked) >= 4
    assert all(diff <= tol for diff, tol in checked), checked
    # step 1, from the same weights and rollouts: the teachers' logprobs enter the loss through the advantages,
    # times importance weights <= 2, and the token mean (of terms <= 10) rounds in float32
    tokens = data["stages"]["student"]["batch_size"] * data["stages"]["student"]["group_size"] * 12
    bound = 2 * max(tol for _, tol in checked) + 2 * gamma(tokens) * 10
    assert losses("shared")[0] == pytest.approx(losses("plain")[0], rel=0, abs=bound)
    assert "teacher_shared_prefill" in SETTINGS_NOT_IN_IDENTITY
