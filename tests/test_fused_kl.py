"""`learner.fused_kl` against the composed losses of `learner.objectives` in float64 on a small vocabulary:
values, the teacher's log-sum-exp and gradients equal to 1e-12, with and without -inf logits (a masked
vocabulary, where 0 log 0 counts 0); and against the definition sum_v p_v log(p_v / q_v) written out."""

from __future__ import annotations

import math

import pytest
import torch

from mopd.learner.fused_kl import forward_kl_and_teacher_lse, reverse_kl_and_teacher_lse
from mopd.learner.objectives import forward_kl_tokens, reverse_kl_tokens

PAIRS = {"reverse": (reverse_kl_and_teacher_lse, reverse_kl_tokens),
         "forward": (forward_kl_and_teacher_lse, forward_kl_tokens)}


def _logits(masked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2
    if masked:  # token 4 impossible under both
        s[..., 4] = t[..., 4] = -math.inf
    return s, t


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", list(PAIRS))
def test_fused_equals_composed(kind: str, masked: bool) -> None:
    fused, composed = PAIRS[kind]
    s, t = _logits(masked)
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = s.clone().requires_grad_(True)
    kl_a, lse = fused(a, t)
    (kl_a * weights).sum().backward()
    b = s.clone().requires_grad_(True)
    kl_b = composed(b, t)
    (kl_b * weights).sum().backward()
    torch.testing.assert_close(kl_a, kl_b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(t, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(a.grad).all() and a.grad.abs().max() > 0


def test_the_definition_written_out() -> None:
    s, t = _logits(False)
    p, q = s.softmax(-1), t.softmax(-1)
    reverse, _ = reverse_kl_and_teacher_lse(s, t)
    forward, _ = forward_kl_and_teacher_lse(s, t)
    torch.testing.assert_close(reverse, (p * (p / q).log()).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(forward, (q * (q / p).log()).sum(-1), rtol=1e-12, atol=1e-12)


def test_mass_where_the_teacher_has_none_is_an_infinite_reverse_kl() -> None:
    s, t = _logits(False)
    t[0, 0, 2] = -math.inf  # the student gives token 2 mass, the teacher none: KL(p || q) = inf there
    kl, _ = reverse_kl_and_teacher_lse(s, t)
    assert kl[0, 0] == math.inf and torch.isfinite(kl.flatten()[1:]).all()
    assert kl[0, 0] == reverse_kl_tokens(s, t)[0, 0]
