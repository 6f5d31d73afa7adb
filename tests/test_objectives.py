import pytest
import torch

from mopd.learner.advantages import opd_advantages
from mopd.learner.objectives import (
    forward_kl_loss,
    full_reverse_kl_loss,
    generalized_jsd_loss,
    teacher_topk,
    topk_reverse_kl_loss,
)

B, T, V = 2, 3, 5
MASK_B_T = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (1.5 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = 1.5 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    return student, teacher


def _probs64(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    e = logits_B_T_V.exp()
    return e / e.sum(-1, keepdim=True)


def _kl64(a_B_T_V: torch.Tensor, b_B_T_V: torch.Tensor) -> torch.Tensor:
    return (a_B_T_V * (a_B_T_V.log() - b_B_T_V.log())).sum(-1)


def _token_mean64(x_B_T: torch.Tensor) -> torch.Tensor:
    return (x_B_T * MASK_B_T.double()).sum() / MASK_B_T.sum()


def _exact_reverse(student, teacher):
    return _token_mean64(_kl64(_probs64(student), _probs64(teacher)))


def _exact_forward(student, teacher):
    return _token_mean64(_kl64(_probs64(teacher), _probs64(student)))


def _exact_jsd(student, teacher, beta):
    p, q = _probs64(student), _probs64(teacher)
    m = beta * q + (1 - beta) * p
    return _token_mean64(beta * _kl64(q, m) + (1 - beta) * _kl64(p, m))


def _assert_value_and_grad(loss_fn, exact_fn, seed):
    student, teacher = _logits(seed)
    loss, _ = loss_fn(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    exact = exact_fn(student, teacher)
    (grad_exact,) = torch.autograd.grad(exact, student)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), grad_exact, rtol=1e-4, atol=1e-6)
    assert exact.item() > 0.05


def test_full_reverse_kl_exact():
    _assert_value_and_grad(lambda s, t: full_reverse_kl_loss(s, t, MASK_B_T), _exact_reverse, 0)


def test_forward_kl_exact():
    _assert_value_and_grad(lambda s, t: forward_kl_loss(s, t, MASK_B_T), _exact_forward, 1)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_exact(beta):
    _assert_value_and_grad(
        lambda s, t: generalized_jsd_loss(s, t, MASK_B_T, beta), lambda s, t: _exact_jsd(s, t, beta), 2
    )


def test_jsd_limits_and_bounds():
    student, teacher = _logits(3)
    student = student.detach()
    fkl = _exact_forward(student, teacher).item()
    rkl = _exact_reverse(student, teacher).item()
    beta = 1e-4
    assert generalized_jsd_loss(student, teacher, MASK_B_T, beta)[0].item() / beta == pytest.approx(
        fkl, rel=0.01
    )
    assert generalized_jsd_loss(student, teacher, MASK_B_T, 1 - beta)[0].item() / beta == pytest.approx(
        rkl, rel=0.01
    )
    assert (
        generalized_jsd_loss(student, teacher, MASK_B_T, 0.5)[0].item() <= torch.log(torch.tensor(2.0)) + 1e-6
    )
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError):
            generalized_jsd_loss(student, teacher, MASK_B_T, bad)


def test_losses_are_zero_when_student_equals_teacher():
    _, teacher = _logits(4)
    for loss_fn in (full_reverse_kl_loss, forward_kl_loss):
        assert loss_fn(teacher, teacher, MASK_B_T)[0].abs().item() < 1e-6
    assert generalized_jsd_loss(teacher, teacher, MASK_B_T, 0.5)[0].abs().item() < 1e-6


def test_sampled_token_opd_matches_reverse_kl_in_expectation():
    student, teacher = _logits(5)
    student = student.detach().float()
    teacher = teacher.float()
    logp, logq = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    n = 20_000  # samples per position
    gen = torch.Generator().manual_seed(5)
    y_NBT = torch.multinomial(logp.exp().reshape(-1, V), n, replacement=True, generator=gen).T.reshape(
        n, B, T
    )
    student_lp = logp.expand(n, B, T, V).gather(-1, y_NBT[..., None]).squeeze(-1).reshape(n * B, T)
    teacher_lp = logq.expand(n, B, T, V).gather(-1, y_NBT[..., None]).squeeze(-1).reshape(n * B, T)
    _, metrics = opd_advantages(teacher_lp, student_lp, MASK_B_T.repeat(n, 1))
    exact = full_reverse_kl_loss(student, teacher, MASK_B_T)[0].item()
    # a statistical bound: the log ratio's exact variance at the 4 positions gives the n-sample mean a standard
    # error of 0.0045, so 0.03 is 6.7 standard errors (the draws are the seeded generator's)
    assert metrics["opd/reverse_kl"] == pytest.approx(exact, abs=0.03)


def _coarse_student64(student_B_T_V, ids_B_T_K):
    p = _probs64(student_B_T_V)
    p_in = p.gather(-1, ids_B_T_K)
    return torch.cat([p_in, 1 - p_in.sum(-1, keepdim=True)], -1)


def test_teacher_topk_helper():
    _, teacher = _logits(6)
    lp, ids = teacher_topk(teacher, 2)
    full = torch.log_softmax(teacher.float(), -1)
    torch.testing.assert_close(lp, full.topk(2, -1).values)
    torch.testing.assert_close(full.gather(-1, ids), lp)


def test_topk_reverse_kl_exact_coarse_grained_value_and_grad():
    student, teacher = _logits(7)
    lp, ids = teacher_topk(teacher, 2)
    loss, metrics = topk_reverse_kl_loss(student, lp, ids, MASK_B_T)
    (grad,) = torch.autograd.grad(loss, student)

    q_full = _probs64(teacher)
    q_in = q_full.gather(-1, ids)
    q_coarse = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    exact = _token_mean64(_kl64(_coarse_student64(student, ids), q_coarse))
    (grad_exact,) = torch.autograd.grad(exact, student)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-4)
    torch.testing.assert_close(grad.double(), grad_exact, rtol=1e-3, atol=1e-5)
    # data-processing inequality: coarse-graining can only lower the KL
    assert 0 < loss.item() <= full_reverse_kl_loss(student, teacher, MASK_B_T)[0].item() + 1e-6
    assert 0 < metrics["distill/teacher_topk_mass"] < 1


def test_topk_with_k_equal_v_is_full_reverse_kl():
    student, teacher = _logits(8)
    lp, ids = teacher_topk(teacher, V)
    loss, _ = topk_reverse_kl_loss(student, lp, ids, MASK_B_T)
    (grad,) = torch.autograd.grad(loss, student)
    full, _ = full_reverse_kl_loss(student, teacher, MASK_B_T)
    (grad_full,) = torch.autograd.grad(full, student)
    assert loss.item() == pytest.approx(full.item(), rel=1e-4)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_full, rtol=1e-3, atol=1e-5)


def test_topk_reverse_kl_minimized_at_teacher():
    _, teacher = _logits(9)
    teacher = teacher.float()
    lp, ids = teacher_topk(teacher, 2)

    # loss 0 and gradient ~0 at student = teacher
    at_teacher = teacher.clone().requires_grad_()
    loss, _ = topk_reverse_kl_loss(at_teacher, lp, ids, MASK_B_T)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and at_teacher.grad.abs().max() < 1e-5

    # from a random init, Adam converges to the teacher's coarse-grained distribution
    student = torch.randn(B, T, V, generator=torch.Generator().manual_seed(10)).requires_grad_()
    assert topk_reverse_kl_loss(student, lp, ids, MASK_B_T)[0].item() > 0.05
    opt = torch.optim.Adam([student], lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        loss, _ = topk_reverse_kl_loss(student, lp, ids, MASK_B_T)
        loss.backward()
        opt.step()
    assert loss.item() < 1e-5
    on = MASK_B_T.bool()
    q_in = lp.exp()
    q_coarse = torch.cat([q_in, 1 - q_in.sum(-1, keepdim=True)], -1)
    p_coarse = _coarse_student64(student.detach().double(), ids).float()
    torch.testing.assert_close(p_coarse[on], q_coarse[on], atol=2e-3, rtol=0)


def test_topk_reverse_kl_rejects_bad_shapes():
    student, teacher = _logits(11)
    lp, ids = teacher_topk(teacher, 2)
    with pytest.raises(ValueError):
        topk_reverse_kl_loss(student, lp, ids[..., :1], MASK_B_T)
