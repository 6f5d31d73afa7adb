"""The data-parallel learner: a step's gradient on 2 gloo workers (each with its share of the micro-batches, the
gradients summed) equals the 1-worker gradient within float32's reduction-order error (`tolerances`), and so
do the metrics; every rank ends with the same summed gradient; the micro-batch split is exact in small cases."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner.data_parallel import DataParallel
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.learner.strategy import LOCAL, Learner, data_parallel
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.panel import TeacherPanel

from .rounding import decoder_path_terms, gamma, two_path_grad_tol

TINY = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=48)
TOK = build_char_tokenizer(ALPHABET)
STAGE = MOPDStage(kind="mopd", init="x", steps=1, teachers={"addition": "t_add", "reversal": "t_rev"},
                  alpha=0.5, group_size=3, max_new_tokens=6)
def tolerances(cfg, batch_shape: tuple[int, int], grads: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(gradient entry, token mean) tolerances between one process and W ranks on one step of a batch of
    `batch_shape` (rows, positions) under the tiny decoder `cfg`.

    The ranks compute the same sums in another order and blocking: each rank sums its own rows (micro-batches add
    up in `.grad`), then the ranks' sums are added. Whatever the order, each path is within a rounding bound of
    the exact value (`rounding.py`), so the two within twice it. A gradient entry sums every position's
    contribution, each made through the decoder's terms forward and back (`two_path_grad_tol`); the loss and the
    metrics are token means of values of order 1 (relative where larger), each made through the same path. A
    tolerance measured on one CPU would not be a bound: another CPU's kernels (AVX512 against AVX2) sum in other
    blocks.
    """
    rows, width = batch_shape
    positions = rows * width
    means = 2 * gamma(decoder_path_terms(cfg, width, len(TOK)) + positions)
    return two_path_grad_tol(cfg, width, len(TOK), positions, grads), means


class Passing:
    """Rewards with a GRPO signal: a completion of odd length passes."""

    def verify(self, problem, completion):
        return float(len(completion) % 2)


def panel_and_problems() -> tuple[TeacherPanel, list]:
    """The two frozen teachers routed by domain, and the step's 7 problems (fixed seeds)."""
    teachers = {"t_add": build_tiny_model(TINY, len(TOK), TOK, 1), "t_rev": build_tiny_model(TINY, len(TOK), TOK, 2)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"addition": "t_add", "reversal": "t_rev"})
    rng = random.Random(0)
    return panel, [*get_domain("addition").sample_train(rng, 4), *get_domain("reversal").sample_train(rng, 3)]


def sample_batch(student, problems):
    batch, _ = rollout(student, TOK, problems, {"addition": Passing(), "reversal": Passing()}, STAGE,
                       temperature=1.0, generator=torch.Generator().manual_seed(3))
    return batch


def _step(learner: Learner, micro: int | None) -> tuple[dict[str, torch.Tensor], dict[str, float], tuple[int, int]]:
    """One MOPD step (sampled objective + alpha GRPO, two teachers) from fixed seeds, as the training driver runs
    it with the learner strategy: (gradients, metrics, the batch's rows and positions)."""
    torch.manual_seed(0)
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    panel, problems = panel_and_problems()
    batch = sample_batch(student, problems)
    cfg = PolicyConfig(sampling=STAGE, distill=STAGE, teachers=panel)
    loss, metrics = policy_loss(student, batch, cfg, temperature=1.0, micro_batch_size=micro, dp=learner.group)
    learner.backward(loss)
    learner.sum_gradients([p for p in student.parameters() if p.requires_grad])
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return grads, metrics, tuple(batch.input_ids_B_T.shape)


MICRO = (None, 5)  # one micro-batch per worker (21 rows: 11 + 10); five of 5 rows, shared 3 + 2


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save([_step(data_parallel("ddp", rank, world), micro) for micro in MICRO], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_workers_give_the_one_worker_gradient(tmp_path):
    """7 problems x 3 rows = 21 rows; one worker computes the whole batch in one part; two workers share its
    rows in micro-batches (both splits in one pair of processes: starting them is most of the test's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, one_metrics, shape = _step(LOCAL, None)
    finally:
        torch.set_num_threads(threads)
    # forked: the workers start with mopd imported (spawning them costs ~10 s of imports each here)
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    largest = max(float(g.abs().max()) for g in one.values())
    assert largest > 0
    tolerance, means = tolerances(TINY, shape, one)
    for split in range(len(MICRO)):
        (g0, _, _), (g1, metrics1, _) = ranks[0][split], ranks[1][split]
        assert one.keys() == g0.keys() == g1.keys()
        for name, g in one.items():
            assert torch.equal(g0[name], g1[name]), name  # every replica gets the same summed gradient
            assert float((g0[name] - g).abs().max()) <= tolerance, (MICRO[split], name)
        for key, value in one_metrics.items():
            assert metrics1[key] == pytest.approx(value, rel=means, abs=means), (MICRO[split], key)


def test_micro_batches_go_round_robin_to_ranks():
    dp = DataParallel(rank=1, world=2)
    assert dp.chunk_size(21, None) == 11 and dp.chunk_size(21, 5) == 5
    assert [i for i, _ in dp.mine(["a", "b", "c", "d", "e"])] == [1, 3]
    assert DataParallel(0, 3).mine(["a"]) == [(0, "a")] and DataParallel(2, 3).mine(["a"]) == []
