"""The data-parallel learner: a step's gradient on 2 gloo workers (each with its share of the micro-batches, the
gradients summed) equals the 1-worker gradient to 1e-6 of its largest entry, and so do the loss and metrics;
every rank ends with the same summed gradient; the micro-batch split is exact in small cases."""

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
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.panel import TeacherPanel

TINY = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=48)
TOK = build_char_tokenizer(ALPHABET)
STAGE = MOPDStage(kind="mopd", init="x", steps=1, teachers={"addition": "t_add", "reversal": "t_rev"},
                  alpha=0.5, group_size=3, max_new_tokens=6)


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


def _step(dp: DataParallel | None, micro: int | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One MOPD step (sampled objective + alpha GRPO, two teachers) from fixed seeds: (gradients, metrics)."""
    torch.manual_seed(0)
    student = build_tiny_model(TINY, len(TOK), TOK, 0)
    panel, problems = panel_and_problems()
    batch = sample_batch(student, problems)
    cfg = PolicyConfig(sampling=STAGE, distill=STAGE, teachers=panel)
    loss, metrics = policy_loss(student, batch, cfg, temperature=1.0, micro_batch_size=micro, dp=dp)
    if loss.requires_grad:
        loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    if dp is not None:
        dp.sum_gradients(params)
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}, metrics


MICRO = (None, 5)  # one micro-batch per worker (21 rows: 11 + 10); five of 5 rows, shared 3 + 2


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save([_step(DataParallel(rank, world), micro) for micro in MICRO], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_workers_give_the_one_worker_gradient(tmp_path):
    """7 problems x 3 rows = 21 rows; one worker computes the whole batch in one part; two workers share its
    rows in micro-batches (both splits in one pair of processes: starting them is most of the test's time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, one_metrics = _step(None, None)
    finally:
        torch.set_num_threads(threads)
    # forked: the workers start with mopd imported (spawning them costs ~10 s of imports each here)
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    largest = max(float(g.abs().max()) for g in one.values())
    assert largest > 0
    for split in range(len(MICRO)):
        (g0, _), (g1, metrics1) = ranks[0][split], ranks[1][split]
        assert one.keys() == g0.keys() == g1.keys()
        for name, g in one.items():
            assert torch.equal(g0[name], g1[name]), name  # every replica gets the same summed gradient
            assert float((g0[name] - g).abs().max()) <= 1e-6 * largest, (MICRO[split], name)
        for key, value in one_metrics.items():
            assert metrics1[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (MICRO[split], key)


def test_micro_batches_go_round_robin_to_ranks():
    dp = DataParallel(rank=1, world=2)
    assert dp.chunk_size(21, None) == 11 and dp.chunk_size(21, 5) == 5
    assert [i for i, _ in dp.mine(["a", "b", "c", "d", "e"])] == [1, 3]
    assert DataParallel(0, 3).mine(["a"]) == [(0, "a")] and DataParallel(2, 3).mine(["a"]) == []
