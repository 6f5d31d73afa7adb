import math

import pytest
import torch

from mopd.learner.advantages import opd_advantages
from mopd.learner.losses import policy_gradient_loss, sft_nll_loss, surprise_weights

# Hand example: 5 tokens, the last one off-mask. Ratios rho = [1, 0.4, 2.5, 1.5, 1].
LOGPROBS = [-1.0, -2.0, -0.5, -1.2, -0.3]
RATIOS = [1.0, 0.4, 2.5, 1.5, 1.0]
ADV = [2.0, -1.0, -1.0, -3.0, 7.0]
MASK = [1.0, 1.0, 1.0, 1.0, 0.0]


def _hand_inputs():
    logprobs = torch.tensor([LOGPROBS], requires_grad=True)
    sampler = torch.tensor([[lp - math.log(r) for lp, r in zip(LOGPROBS, RATIOS, strict=True)]])
    return logprobs, sampler, torch.tensor([ADV]), torch.tensor([MASK])


@pytest.mark.parametrize(
    ("is_mode", "loss", "grad", "dropped_frac"),
    [
        # kept: token 0 (rho 1) and token 3 (rho 1.5); tokens 1 (0.4) and 2 (2.5) dropped; divide by 4 mask tokens
        ("truncate", -(1.0 * 2.0 + 1.5 * -3.0) / 4, [-2.0 / 4, 0.0, 0.0, 4.5 / 4, 0.0], 0.5),
        # token 1: A<0, rho<0.5 -> clipped branch -0.5*A is the min's argument: constant, zero grad
        # token 2: A<0, rho>2 -> unclipped branch rho*A is smaller: grad -rho*A = 2.5
        ("clip", (-2.0 + 0.5 + 2.5 + 4.5) / 4, [-2.0 / 4, 0.0, 2.5 / 4, 4.5 / 4, 0.0], 0.25),
        # REINFORCE: -A * logprob, sampler ignored
        (
            "none",
            -(2.0 * -1.0 + -1.0 * -2.0 + -1.0 * -0.5 + -3.0 * -1.2) / 4,
            [-0.5, 0.25, 0.25, 0.75, 0.0],
            0.0,
        ),
    ],
)
def test_policy_gradient_hand_example(is_mode, loss, grad, dropped_frac):
    logprobs, sampler, adv, mask = _hand_inputs()
    out, metrics = policy_gradient_loss(logprobs, sampler, adv, mask, is_mode=is_mode)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.tensor([grad]))
    assert metrics["is/dropped_frac"] == pytest.approx(dropped_frac)
    assert metrics["is/ratio_mean"] == pytest.approx((1.0 + 0.4 + 2.5 + 1.5) / 4, abs=1e-6)
    assert metrics["adv/clipped_frac"] == 0.0  # |7| > 5 only on the off-mask token
    assert metrics["adv/mean"] == pytest.approx((2 - 1 - 1 - 3) / 4)


def test_truncation_bounds_are_inclusive_and_configurable():
    logprobs = torch.zeros(1, 4, requires_grad=True)
    sampler = -torch.log(torch.tensor([[0.5, 2.0, 0.49, 2.01]]))
    _, metrics = policy_gradient_loss(logprobs, sampler, torch.ones(1, 4), torch.ones(1, 4))
    assert metrics["is/dropped_frac"] == pytest.approx(0.5)
    _, metrics = policy_gradient_loss(
        logprobs, sampler, torch.ones(1, 4), torch.ones(1, 4), eps_low=0.4, eps_high=3.0
    )
    assert metrics["is/dropped_frac"] == 0.0


def test_advantage_clipping_at_5():
    logprobs = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[6.0, -8.0, 1.0]])
    loss, metrics = policy_gradient_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 3))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[5.0, -5.0, 1.0]]) / 3)
    assert metrics["adv/clipped_frac"] == pytest.approx(2 / 3)
    assert metrics["adv/mean"] == pytest.approx(1 / 3)
    _, metrics_off = policy_gradient_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 3), adv_clip=None)
    assert metrics_off["adv/clipped_frac"] == 0.0
    assert metrics_off["adv/mean"] == pytest.approx(-1 / 3)


def test_loss_normalizer_and_empty_mask():
    logprobs = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    loss, _ = policy_gradient_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 2), loss_normalizer=8.0)
    assert loss.item() == pytest.approx(-2.0 / 8)
    loss, metrics = policy_gradient_loss(logprobs, logprobs.detach(), adv, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logprobs.grad == 0)
    assert metrics["is/dropped_frac"] == 0.0
    with pytest.raises(ValueError):
        policy_gradient_loss(logprobs, logprobs.detach(), adv, torch.ones(1, 2), is_mode="ppo")


# --- Monte Carlo: sampled-token OPD + policy-gradient loss is an unbiased reverse-KL gradient -----------------

V = 5
N = 200_000


def _opd_pg_loss(student_logprobs_N_T: torch.Tensor, teacher_logprobs_N_T: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(student_logprobs_N_T)
    adv, _ = opd_advantages(teacher_logprobs_N_T, student_logprobs_N_T, mask)
    # ratio 1: the sampler is the current policy
    loss, metrics = policy_gradient_loss(student_logprobs_N_T, student_logprobs_N_T.detach(), adv, mask)
    assert metrics["is/dropped_frac"] == 0.0 and metrics["adv/clipped_frac"] == 0.0
    return loss


def test_mc_opd_gradient_matches_exact_reverse_kl_gradient_single_step():
    gen = torch.Generator().manual_seed(1234)
    theta_V = torch.tensor([0.5, -0.3, 1.0, 0.0, -1.0], requires_grad=True)
    teacher_logprobs_V = torch.log_softmax(torch.tensor([-0.5, 0.8, 0.2, 0.0, 0.3]), -1)

    logp_V = torch.log_softmax(theta_V, -1)
    y_N = torch.multinomial(logp_V.detach().exp(), N, replacement=True, generator=gen)
    loss = _opd_pg_loss(logp_V[y_N][:, None], teacher_logprobs_V[y_N][:, None])
    (grad_mc,) = torch.autograd.grad(loss, theta_V, retain_graph=True)

    exact_kl = (logp_V.exp() * (logp_V - teacher_logprobs_V)).sum()
    (grad_exact,) = torch.autograd.grad(exact_kl, theta_V)
    # a statistical bound: the standard error of each entry of the N-sample mean is <= 8.6e-4 (the per-sample
    # gradient's exact variance over the 5 tokens, / N), so 0.01 is 11 standard errors; the draws are the seeded
    # generator's, and rounding can change a draw only where a uniform lands within an ulp of a boundary
    assert (grad_mc - grad_exact).abs().max() < 0.01, (grad_mc, grad_exact)
    assert grad_exact.abs().max() > 0.1  # the test is not vacuous


def test_mc_opd_gradient_two_positions_is_per_position_reverse_kl_gradient():
    """Per-token OPD (no credit to earlier tokens) follows grad sum_t E_{y_<t ~ sg pi_S} KL_t, not the
    gradient of the sequence KL; check against the exact gradient of that objective by enumeration."""
    gen = torch.Generator().manual_seed(99)
    theta1_V = torch.tensor([0.3, -0.2, 0.8, 0.0, -0.6], requires_grad=True)
    theta2_V_V = (0.8 * torch.randn(V, V, generator=gen)).requires_grad_()  # row = previous token
    teacher1_V = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 0.4, 0.1]), -1)
    teacher2_V_V = torch.log_softmax(0.8 * torch.randn(V, V, generator=gen), -1)

    logp1_V = torch.log_softmax(theta1_V, -1)
    logp2_V_V = torch.log_softmax(theta2_V_V, -1)
    y1_N = torch.multinomial(logp1_V.detach().exp(), N, replacement=True, generator=gen)
    y2_N = torch.multinomial(logp2_V_V.detach().exp()[y1_N], 1, generator=gen).squeeze(1)
    student_N_T = torch.stack([logp1_V[y1_N], logp2_V_V[y1_N, y2_N]], dim=1)
    teacher_N_T = torch.stack([teacher1_V[y1_N], teacher2_V_V[y1_N, y2_N]], dim=1)
    # the loss is a token mean over 2 positions: scale by 2 to get the per-sequence sum
    loss = 2.0 * _opd_pg_loss(student_N_T, teacher_N_T)
    grads_mc = torch.autograd.grad(loss, [theta1_V, theta2_V_V], retain_graph=True)

    kl1 = (logp1_V.exp() * (logp1_V - teacher1_V)).sum()
    kl2_V = (logp2_V_V.exp() * (logp2_V_V - teacher2_V_V)).sum(-1)
    objective = kl1 + (logp1_V.detach().exp() * kl2_V).sum()
    grads_exact = torch.autograd.grad(objective, [theta1_V, theta2_V_V], retain_graph=True)
    for g_mc, g_exact in zip(grads_mc, grads_exact, strict=True):  # standard errors <= 9e-4: 0.01 is 11 of them
        assert (g_mc - g_exact).abs().max() < 0.01, (g_mc, g_exact)
    # ... and the test can tell: the sequence-KL gradient (prefix distribution not held fixed) differs
    sequence_kl = kl1 + (logp1_V.exp() * kl2_V).sum()
    (grad_seq_theta1,) = torch.autograd.grad(sequence_kl, theta1_V)
    assert (grads_mc[0] - grad_seq_theta1).abs().max() > 0.04


def test_sft_nll_loss():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
    loss, metrics = sft_nll_loss(logprobs, torch.tensor([[1.0, 1.0, 0.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5, 0.0]]))
    assert metrics == {"sft/nll": pytest.approx(1.5), "sft/num_tokens": 2.0}


def test_surprise_weights():
    logprobs = torch.log(torch.tensor([[1.0, 0.5, 0.1]])).requires_grad_()
    w = surprise_weights(logprobs, alpha=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 2.8]]))
    assert not w.requires_grad
    torch.testing.assert_close(surprise_weights(logprobs, 0.0), torch.ones(1, 3))
