"""`micro_batch_by_length`: micro-batches take the rows longest first and each runs over its own columns (none that
are padding in all its rows), for the student and the teachers. Every objective's loss, metrics (whose kept
per-row tensors must come back in the batch's row order) and gradient equal the whole batch's, in float64; the
decoders really see fewer columns; a micro-batch whose rows are all short loses its trailing columns, one whose
prompts are all short its leading ones."""

from __future__ import annotations

import pytest
import torch

from mopd.core.errors import RecipeError
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss, repad
from mopd.recipe.load import load_recipe
from mopd.teachers.panel import TeacherPanel

from .rounding import gamma
from .test_chunked_objectives import CASES, _batch, _models, _on_policy


def _step(student, panel, batch, settings, micro, by_length):
    student.zero_grad(set_to_none=True)
    distill = settings if hasattr(settings, "objective") else None
    cfg = PolicyConfig(sampling=settings, distill=distill, teachers=panel if distill else None)
    loss, metrics = policy_loss(student, batch, cfg, temperature=settings.temperature, micro_batch_size=micro,
                                logit_chunk=4, by_length=by_length)
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in student.named_parameters()}


class Widths:
    """Rows x columns of every decoder call (student and teachers), through a forward pre-hook."""

    def __init__(self, *models):
        self.tokens = 0
        self.handles = [m.model.register_forward_pre_hook(self.hook, with_kwargs=True) for m in models]

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += ids.numel()

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("case", CASES)
def test_by_length_equals_the_whole_batch_for_every_objective(case: str) -> None:
    student, teachers = _models()
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"}, logit_chunk=4)
    settings = CASES[case]
    batch = _on_policy(student, _batch(), settings.temperature)
    whole = _step(student, panel, batch, settings, None, False)
    plain_widths = Widths(student, *teachers.values())
    plain = _step(student, panel, batch, settings, 2, False)
    plain_widths.close()
    sorted_widths = Widths(student, *teachers.values())
    by_length = _step(student, panel, batch, settings, 2, True)
    sorted_widths.close()
    assert sorted_widths.tokens < plain_widths.tokens  # padding columns dropped
    assert any(g.abs().max() > 0 for g in whole[2].values())
    # Float64 models: the two paths' forwards and backwards differ by float64 rounding, gamma(2N + tokens, U64) of
    # the magnitudes (N = 359 terms along a logprob's path, 54 tokens: ~1e-13), which rtol 1e-10 and atol 1e-12
    # (gradients, losses and metrics here are of magnitude <= 10) cover with room. But the policy-gradient loss
    # (and the top-k teacher's log-probabilities) run in float32, and its micro-batches' sums with it (as plain
    # micro-batches do): each token's term and coefficient rounds <= 8 times elementwise and the 54 tokens are
    # summed in float32, so those cases are within 2 gamma(54 + 8) (~7e-6) of the magnitude scale: the largest
    # gradient entry for gradients, 10 for the loss and metrics (|advantage| <= adv_clip 5 times an importance
    # weight <= 2). A row or a column put back in the wrong place moves them by O(1/6) of their scale.
    if case in ("grpo", "sampled+grpo+surprise, T=0.7", "topk+grpo", "forward_kl, T=1.3", "sampled"):
        relative = 2 * gamma(batch.completion_mask_B_T.numel() + 8)
        scale = max(float(g.abs().max()) for g in whole[2].values())
        tol = dict(rtol=0.0, atol=relative * 10, metric_rtol=0.0, metric_atol=relative * 10,
                   grad_atol=relative * scale)
    else:
        tol = dict(rtol=1e-10, atol=1e-12, metric_rtol=1e-9, metric_atol=1e-11, grad_atol=1.1e-11)
    for got in (plain, by_length):
        assert got[0] == pytest.approx(whole[0], rel=tol["rtol"], abs=tol["atol"])
        assert got[1].keys() == whole[1].keys()
        for k, v in whole[1].items():
            assert got[1][k] == pytest.approx(v, rel=tol["metric_rtol"], abs=tol["metric_atol"]), (case, k)
        for name, g in whole[2].items():
            torch.testing.assert_close(got[2][name], g, rtol=tol["rtol"], atol=tol["grad_atol"],
                                       msg=lambda m, n=name: f"{case} {n}: {m}")


def test_a_micro_batch_of_short_rows_runs_over_fewer_columns() -> None:
    """Six rows: completions of 9 and 1 tokens and four others; prompts of 2 to 7. Longest first in pairs, the
    last pair's columns are the fewest; the pairs' widths add up to less than 3 x the batch's."""
    student, teachers = _models()
    batch = _on_policy(student, _batch(), 1.0)
    settings = CASES["full_reverse_kl"]
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"}, logit_chunk=4)
    seen: list[tuple[int, int]] = []
    handle = student.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        _step(student, panel, batch, settings, 2, True)
    finally:
        handle.remove()
    T = batch.input_ids_B_T.shape[1]
    lengths = batch.attention_mask_B_T.sum(1)
    assert [r for r, _ in seen] == [2, 2, 2]
    assert seen[0][1] <= T and seen[-1][1] < T
    assert [c for _, c in seen] == sorted((c for _, c in seen), reverse=True)  # longest rows first
    assert seen[-1][1] >= int(lengths.sort(descending=True).values[-2:].max())  # every real token kept


def test_repad_puts_columns_back_where_they_were() -> None:
    t = torch.arange(6.0).view(2, 3)
    out = repad({"x_B_T": t, "y_B_K": t}, 1, 2)
    assert torch.equal(out["x_B_T"], torch.tensor([[0, 0, 1, 2, 0, 0], [0, 3, 4, 5, 0, 0.0]]))
    assert torch.equal(out["y_B_K"], torch.tensor([[0, 1, 2, 0, 0], [3, 4, 5, 0, 0.0]]))
    with pytest.raises(ValueError, match="layout"):
        repad({"z": t}, 1, 0)


def test_by_length_without_micro_batches_is_one_line(tmp_path) -> None:
    """`micro_batch_size: null` is the whole batch a pass, so sorting rows into micro-batches contradicts it (left
    out, `auto`, the stage chooses micro-batches and may sort them)."""
    text = (
        "name: r\nseed: 0\ndomains: [addition]\nstages:\n  base:\n    kind: pretrain\n"
        "    model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}\n    steps: 1\n"
        "  rl:\n    kind: rlvr\n    init: base\n    steps: 1\n    micro_batch_by_length: true\n"
        "    micro_batch_size: null\n"
    )
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError, match="`micro_batch_by_length` sorts rows into micro-batches: set "
                                          "`micro_batch_size` too"):
        load_recipe(tmp_path / "r.yaml")
