"""Vocabulary blocks (`core.vocab_blocks`): the sampled-token log-probabilities, tempered log-probabilities and
entropies of every position at once, a block of vocabulary columns at a time, equal log_softmax over the whole
vocabulary, values and gradients, in float64; the policy step of the advantage objectives and the panel's teacher
scores equal the one-block computation; and no tensor wider than a block of the vocabulary is ever made."""

from __future__ import annotations

import pytest
import torch

from mopd.core.vocab_blocks import sampled_token_head, sampled_token_logprobs
from mopd.teachers.panel import TeacherPanel

from .test_chunked_objectives import (
    CASES,
    F64,
    TOK,
    _assert_same,
    _batch,
    _LogitProbe,
    _models,
    _on_policy,
    _step,
)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block", [1, 4, 23, 64])  # one column, blocks that do not divide V, one block
def test_head_matches_log_softmax_exactly(temperature: float, block: int) -> None:
    """Against the composed log_softmax of h W^T in float64: each value within 1e-12 (two float64 paths of
    23-term sums: ~1e-15 apart; a misplaced block or a wrong max shift is O(0.1)), each gradient too, for
    arbitrary upstream gradients on both differentiable outputs."""
    g = torch.Generator().manual_seed(block)
    N, H, V = 9, 5, 23
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = (3 * torch.randn(V, H, dtype=torch.float64, generator=g)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    up_lp, up_t = torch.randn(N, dtype=torch.float64, generator=g), torch.randn(N, dtype=torch.float64, generator=g)

    lp, tlp, ent = sampled_token_head(h, w, y, block, temperature)
    ((lp * up_lp).sum() + (tlp * up_t).sum()).backward()
    got = (lp.detach(), tlp.detach(), ent, h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    s = h @ w.T
    logp = s.log_softmax(-1)
    ref_lp = logp.gather(-1, y[:, None]).squeeze(-1)
    ref_t = (s / temperature).log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    ((ref_lp * up_lp).sum() + (ref_t * up_t).sum()).backward()
    ref = (ref_lp.detach(), ref_t.detach(), -(logp.exp() * logp).sum(-1).detach(), h.grad, w.grad)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not ent.requires_grad
    torch.testing.assert_close(sampled_token_logprobs(h.detach(), w.detach(), y, block), ref[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["sampled", "sampled+grpo+surprise, T=0.7", "grpo"])
def test_policy_step_in_vocab_blocks_equals_one_block(case: str) -> None:
    """Loss, metrics and every parameter's gradient of a step whose student and teachers score the sampled tokens
    a block of vocabulary columns at a time equal the one-block step's in float64 (rows of ragged lengths, two
    teachers, one untied), in one micro-batch and within micro-batches."""
    student, teachers = _models()
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    settings = CASES[case]
    batch = _on_policy(student, _batch(), settings.temperature)
    ref = _step(student, panel, batch, settings, None)
    assert any(g.abs().max() > 0 for g in ref[2].values())
    for block, micro in ((5, None), (len(TOK), None), (7, 4)):
        panel.vocab_block = block
        got = _step(student, panel, batch, settings, None, micro=micro, vocab_block=block)
        _assert_same(ref if micro is None else _step(student, TeacherPanel(models=teachers, teacher_of_domain={
            "a": "t_a", "b": "t_b"}), batch, settings, None, micro=micro), got, **F64)


def test_vocab_block_step_never_makes_a_wider_tensor() -> None:
    """With blocks of 8 of the 39 vocabulary columns, no op of the whole step (student forward and backward, both
    teachers) makes a tensor whose last dimension is the vocabulary: the logits exist only as [N, 8] blocks."""
    student, teachers = _models(torch.float32)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"}, vocab_block=8)
    batch = _on_policy(student, _batch(4), 1.0)
    probe = _LogitProbe(len(TOK))
    with probe:
        _step(student, panel, batch, CASES["sampled"], None, vocab_block=8)
    assert probe.largest == 0
    panel.vocab_block = None
    with probe:
        _step(student, panel, batch, CASES["sampled"], None)
    assert probe.largest > 0  # the probe sees the one-block step's logits
