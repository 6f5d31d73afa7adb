import math

import torch

from mopd.core.logprobs import masked_mean, token_entropy, token_logprobs


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
