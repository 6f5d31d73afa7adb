import math

import pytest
import torch

from mopd.core.routing import route_teachers
from mopd.learner.advantages import combine_advantages, grpo_advantages, mopd_metrics, opd_advantages


def test_grpo_hand_example_drops_zero_variance_group():
    # group 7: all rewards 1 (zero variance); group 3: distinct rewards 0, 0.5, 1 (interleaved rows)
    rewards_B = torch.tensor([1.0, 0.0, 1.0, 0.5, 1.0, 1.0])
    group_ids_B = torch.tensor([7, 3, 7, 3, 7, 3])
    mask_B_T = torch.tensor([[1, 1, 0]] * 6, dtype=torch.float32)
    adv_B_T, keep_B, metrics = grpo_advantages(rewards_B, group_ids_B, mask_B_T)

    # group 3: mean 0.5, population std sqrt((0.25 + 0 + 0.25) / 3) = sqrt(1/6)
    a = 0.5 / (math.sqrt(1.0 / 6.0) + 1e-6)
    expected_B = torch.tensor([0.0, -a, 0.0, 0.0, 0.0, a])
    torch.testing.assert_close(adv_B_T, expected_B[:, None] * mask_B_T)
    assert keep_B.tolist() == [False, True, False, True, False, True]
    assert metrics["grpo/zero_variance_frac"] == pytest.approx(0.5)
    assert metrics["grpo/kept_frac"] == pytest.approx(0.5)
    assert metrics["grpo/reward_mean"] == pytest.approx(4.5 / 6)


def test_grpo_keep_all_when_not_dropping_and_zero_adv_for_equal_rewards():
    rewards_B = torch.tensor([0.1, 0.1, 0.1, 0.0, 1.0])
    adv_B_T, keep_B, metrics = grpo_advantages(
        rewards_B, torch.tensor([0, 0, 0, 1, 1]), torch.ones(5, 2), drop_zero_variance=False
    )
    assert keep_B.all()
    assert torch.all(adv_B_T[:3] == 0)  # exactly zero, no eps-divided rounding noise
    torch.testing.assert_close(adv_B_T[3:, 0], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)
    assert metrics["grpo/zero_variance_frac"] == pytest.approx(0.6)


def test_opd_is_teacher_minus_student_and_zero_when_equal():
    teacher = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    student = torch.tensor([[0.0, -1.5, -1.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    adv, metrics = opd_advantages(teacher, student, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, -1.0, 0.0]]))
    assert not adv.requires_grad
    assert metrics["opd/reverse_kl"] == pytest.approx((-0.5 + 1.0) / 2)

    adv_same, metrics_same = opd_advantages(student.detach(), student, mask)
    assert torch.all(adv_same == 0)
    assert metrics_same["opd/reverse_kl"] == 0.0


def test_route_teachers_per_domain_and_missing_domain_error():
    routes = {"math": "qwen-math", "code": "coder"}
    assert route_teachers(["code", "math", "math"], routes) == ["coder", "qwen-math", "qwen-math"]
    with pytest.raises(ValueError, match="chemistry"):
        route_teachers(["math", "chemistry"], routes)


def test_mopd_per_teacher_metrics():
    teacher = torch.tensor([[-1.0, -1.0], [-2.0, -2.0], [-1.0, -3.0]])
    student = torch.tensor([[-1.5, -0.5], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    names = route_teachers(["math", "code", "math"], {"math": "A", "code": "B"})
    adv, _ = opd_advantages(teacher, student, mask)
    metrics = mopd_metrics(adv, mask, names)
    torch.testing.assert_close(adv, (teacher - student) * mask)
    # teacher A: rows 0 and 2, log pi_S - log pi_T on mask tokens = [-0.5, 0.5, 0, 2]
    assert metrics["mopd/reverse_kl/A"] == pytest.approx(2.0 / 4)
    assert metrics["mopd/reverse_kl/B"] == pytest.approx(1.0)
    assert metrics["mopd/routing_share/A"] == pytest.approx(2 / 3)
    assert metrics["mopd/routing_share/B"] == pytest.approx(1 / 3)
    assert metrics["mopd/reverse_kl"] == pytest.approx(3.0 / 5)
    with pytest.raises(ValueError):
        mopd_metrics(adv, mask, names[:2])


def test_combine_with_alpha():
    opd = torch.tensor([[0.5, -1.0]])
    grpo = torch.tensor([[2.0, 2.0]])
    torch.testing.assert_close(combine_advantages(opd, grpo, 0.25), torch.tensor([[1.0, -0.5]]))
    torch.testing.assert_close(combine_advantages(opd, grpo, 0.0), opd)
