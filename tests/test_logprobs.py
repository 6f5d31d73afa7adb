import math

import torch

from mopd.core.logprobs import (
    aligned_logprobs_and_lse,
    aligned_token_entropy,
    fused_logprobs_and_entropy,
    masked_mean,
    token_entropy,
    token_logprobs,
)


def _hand_logits_1_T_V() -> torch.Tensor:
    # position 0: uniform over 3 tokens; position 1: probs [1/4, 1/2, 1/4]; position 2: never used
    return torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [5.0, -3.0, 1.0]]])


def test_token_logprobs_alignment_hand_example():
    input_ids_1_T = torch.tensor([[2, 1, 0]])
    logprobs_1_T = token_logprobs(_hand_logits_1_T_V(), input_ids_1_T)
    # token t's logprob sits at position t and comes from the logits at t-1; position 0 gets 0
    expected = torch.tensor([[0.0, -math.log(3.0), math.log(0.25)]])
    torch.testing.assert_close(logprobs_1_T, expected)


def test_token_entropy_alignment_hand_example():
    entropy_1_T = token_entropy(_hand_logits_1_T_V())
    expected = torch.tensor([[0.0, math.log(3.0), 1.5 * math.log(2.0)]])
    torch.testing.assert_close(entropy_1_T, expected)


def test_token_logprobs_matches_log_softmax_and_grads():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen, requires_grad=True)
    ids = torch.randint(0, 11, (2, 6), generator=gen)
    out = token_logprobs(logits, ids)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out[:, 1:], ref)
    assert torch.all(out[:, 0] == 0)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref)


def test_bf16_logits_give_float32_outputs():
    logits = torch.randn(1, 4, 7).bfloat16()
    ids = torch.randint(0, 7, (1, 4))
    assert token_logprobs(logits, ids).dtype == torch.float32
    assert token_entropy(logits).dtype == torch.float32


def test_entropy_handles_minus_inf_logits():
    logits = torch.tensor([[[0.0, -torch.inf, 0.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[0.0, math.log(2.0)]]))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3.0))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_fused_logprobs_and_entropy_equal_the_composed_ones():
    """The fused logprob + entropy (several chunked blocks use it) against `aligned_logprobs_and_lse` and
    `aligned_token_entropy` in float64: values, and the logprobs' gradient for a random upstream gradient; with
    -inf logits it takes the composed functions (finite entropy, no nan)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 50, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ids = torch.randint(0, 50, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)
    lp, ent = fused_logprobs_and_entropy(logits, ids)
    (grad,) = torch.autograd.grad((lp * upstream).sum(), logits)
    want_lp, lse = aligned_logprobs_and_lse(logits, ids)
    (want_grad,) = torch.autograd.grad((want_lp * upstream).sum(), logits)
    torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, aligned_token_entropy(logits.detach(), lse.detach()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
    assert not ent.requires_grad
    masked = logits.detach().clone()
    masked[..., 10:] = float("-inf")
    lp, ent = fused_logprobs_and_entropy(masked, ids.clamp(max=9))
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (ent <= math.log(10) + 1e-9).all()
