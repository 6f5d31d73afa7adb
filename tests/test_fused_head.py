"""`learner.fused_head` (a KL whose gradient is made in the forward, block by block) against the checkpointed blocks
of `learner.chunked` in float64: the step's loss, metrics and every student parameter's gradient, for reverse and
forward KL, with and without micro-batches and a sampling temperature; and when it applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mopd.core.position_blocks import block_bounds
from mopd.learner import policy
from mopd.learner.fused_head import fusable
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.models.forward import split_head
from mopd.teachers.panel import TeacherPanel

from .test_chunked_objectives import (
    CASES,
    F64,
    TOK,
    _assert_same,
    _batch,
    _HeadRows,
    _models,
    _on_policy,
    _step,
)


def _without_fusion(monkeypatch) -> None:
    monkeypatch.setattr(policy, "fusable", lambda *a: False)


KL = CASES["full_reverse_kl"]
SETTINGS = {"reverse": KL, "forward": KL.model_copy(update={"objective": "forward_kl"}),
            "reverse, T=1.3": KL.model_copy(update={"temperature": 1.3})}


@pytest.mark.parametrize("case", list(SETTINGS))
@pytest.mark.parametrize("micro", [None, 4])
def test_fused_step_equals_checkpointed_blocks(case: str, micro: int | None, monkeypatch) -> None:
    student, teachers = _models()
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    settings = SETTINGS[case]
    assert settings.alpha == 0
    batch = _on_policy(student, _batch(), settings.temperature)
    calls = []
    real = policy.fused_kl_scores
    monkeypatch.setattr(policy, "fused_kl_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = _step(student, panel, batch, settings, 3, micro=micro)
    assert calls  # the fused path ran
    with monkeypatch.context() as m:
        _without_fusion(m)
        blocks = _step(student, panel, batch, settings, 3, micro=micro)
    _assert_same(blocks, fused, **F64)
    assert any(g.abs().max() > 0 for g in fused[2].values())


def test_a_frozen_head_gets_no_gradient_and_the_rest_the_same(monkeypatch) -> None:
    """The head (tied to the embedding) frozen, as when only adapters train: the fused path computes no weight
    gradient, and every other parameter's gradient is the checkpointed blocks' one."""
    student, teachers = _models()
    student.get_output_embeddings().weight.requires_grad_(False)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    batch = _on_policy(student, _batch(), 1.0)

    def grads() -> dict[str, torch.Tensor]:
        student.zero_grad(set_to_none=True)
        panel.logit_chunk = 3
        loss, _ = policy_loss(student, batch, PolicyConfig(sampling=KL, distill=KL, teachers=panel),
                              temperature=1.0, logit_chunk=3)
        loss.backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    fused = grads()
    with monkeypatch.context() as m:
        _without_fusion(m)
        blocks = grads()
    assert fused.keys() == blocks.keys() and "model.embed_tokens.weight" not in fused and len(fused) > 5
    for name, g in blocks.items():
        torch.testing.assert_close(fused[name], g, **F64)


def test_when_it_applies() -> None:
    student, _ = _models()
    head = split_head(student)[1]
    assert fusable(head, K=10, chunk=3) and not fusable(head, K=10, chunk=9) and not fusable(head, 10, None)
    capped = dataclasses.replace(head, final_map=torch.tanh)  # a final map (logit soft-capping): not plain
    assert not fusable(capped, K=10, chunk=3)
    assert not fusable(None, K=10, chunk=3)


def test_fused_blocks_project_each_live_row_once_and_never_recompute() -> None:
    """With grad, the checkpointed blocks project every live row's block twice (forward and recompute), for the
    student and the teacher; the fused path once each (the student's predicting positions only)."""
    student, teachers = _models()
    panel = TeacherPanel(models={"t_a": teachers["t_a"]}, teacher_of_domain={"a": "t_a", "b": "t_a"})
    settings = KL.model_copy(update={"teachers": {"a": "t_a", "b": "t_a"}})
    batch = _on_policy(student, _batch(), 1.0)
    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)
    K = batch.input_ids_B_T.shape[1] - batch.first_completion_column + 1
    live_B_W = batch.completion_mask_B_T[:, -(K - 1) :] > 0
    panel.logit_chunk = 4
    bounds = block_bounds(K, 4)
    teacher = sum(int(live_B_W[:, s : min(e, K - 1)].any(1).sum()) * (e - s) for s, e in bounds)
    own = sum(int(live_B_W[:, s : min(e, K - 1)].any(1).sum()) * (min(e, K - 1) - s) for s, e in bounds)
    with _HeadRows(len(TOK)) as probe:
        loss, _ = policy_loss(student, batch, cfg, temperature=1.0, logit_chunk=4)
        loss.backward()
    assert probe.rows == teacher + own
