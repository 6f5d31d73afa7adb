"""The data-parallel learner with `strategy: fsdp` (`learner.strategy.FSDP`, `learner.sharded`): on 2 gloo ranks
with the decoder layers sharded (unevenly: an odd dimension), one MOPD step's summed gradient equals one
process's within float32's reduction-order error (`test_dp_learner.tolerances`), and so does what the
gradient determines: the clipped norm, the AdamW state, and the updated weights wherever the gradient is well
above its rounding (AdamW's first step is lr * g / (|g| + 1e-8), so below that the update's size and sign are
rounding); with a LoRA student too. Rank 0's unsharded copy, refreshed by one flat gather, equals the shards
exactly; the optimizer state gathered for a checkpoint splits back into the shards exactly (so a stage resumes on
any number of ranks); a rank with fewer micro-batches pads its passes (else the ranks' collectives would not pair
up and the step would hang)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mopd.core.schema.stages import LoraSettings
from mopd.learner import sharded
from mopd.learner.data_parallel import DataParallel
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.strategy import LOCAL, Learner, data_parallel
from mopd.models.lora import apply_lora
from mopd.models.tiny import build_tiny_model

from .rounding import U32, gamma
from .test_dp_learner import STAGE, TINY, TOK, panel_and_problems, sample_batch, tolerances

LR = 1e-2
BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8  # torch's AdamW default
ROUNDINGS = 8  # rounded operations between a gradient and its updated weight (`_weight_bound`)
ODD = TINY.model_copy(update={"intermediate_size": 47})  # gate/up projections of 47 rows: shards of 24 and 23
CLIP = 0.05  # below the step's gradient norm: the clip is exercised
CASES = ((None, False), (5, False), (None, True))  # (micro_batch_size, lora): 11 + 10 rows; 3 + 2 parts; adapters


def _student(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_model(ODD, len(TOK), TOK, 0)
    if lora:
        model = apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in model.named_parameters():  # B starts at zero: give both factors a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if sharded.is_sharded(t) else t.detach().clone()


def _step(learner: Learner, micro: int | None, lora: bool) -> dict:
    """One MOPD step with an AdamW update, as the training driver runs it with the learner strategy: full
    gradients, norm, updated weights and optimizer state."""
    student = _student(lora)
    whole = learner.shard(student, "student")
    panel, problems = panel_and_problems()
    batch = learner.from_lead(lambda: sample_batch(whole, problems))  # rank 0 samples with its unsharded copy
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS)
    loss, metrics = policy_loss(student, batch, PolicyConfig(sampling=STAGE, distill=STAGE, teachers=panel),
                                temperature=1.0, micro_batch_size=micro, dp=learner.group)
    learner.backward(loss)
    learner.sum_gradients(params)
    norm = learner.update_norm(params, CLIP)
    grads = {n: _full(p.grad) for n, p in student.named_parameters() if p.grad is not None}
    opt.step()
    learner.updated()
    out = {"grads": grads, "norm": norm, "loss": float(loss.detach()), "metrics": metrics,
           "shape": tuple(batch.input_ids_B_T.shape), "names": [n for n, p in student.named_parameters() if p.requires_grad],
           "state": learner.optimizer_state(opt),
           "shards": {n: _full(p) for n, p in student.named_parameters() if p.requires_grad}}
    again = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS)
    learner.load_optimizer_state(again, out["state"], params)
    out["round_trip"] = learner.optimizer_state(again)
    if whole is not None:
        out["weights"] = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
    return out


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save([_step(data_parallel("fsdp", rank, world), micro, lora) for micro, lora in CASES],
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _within(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor | float) -> bool:
    return bool(((a - b).abs() <= bound).all())


def _adam_state_bounds(g: torch.Tensor, delta: float) -> dict[str, torch.Tensor | float]:
    """How far the first step's AdamW state may move when every gradient entry may move by `delta`: exp_avg is
    (1 - beta1) g, exp_avg_sq (1 - beta2) g^2; plus one rounding of each product (an ulp, 2 u relative)."""
    a = g.abs()
    return {"exp_avg": (1 - BETAS[0]) * delta + 2 * U32 * (1 - BETAS[0]) * a,
            "exp_avg_sq": (1 - BETAS[1]) * (2 * a + delta) * delta + 2 * U32 * (1 - BETAS[1]) * a * a,
            "step": 0.0}


def _weight_bound(g: torch.Tensor, w: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the updated weight is determined, and how closely. AdamW's first update is lr * g / (|g| + eps)
    (m / (1 - beta1) = g, sqrt(v / (1 - beta2)) = |g|), whose derivative in g is lr * eps / (|g| + eps)^2: an
    entry whose gradient may move by `delta` moves by at most lr * eps * delta / (|g| - delta)^2 where |g| > delta,
    and by up to 2 lr where |g| <= delta (its sign is rounding). Compared where |g| > 2 delta, within that plus
    the roundings that may fall differently once the inputs differ: the update's (of size lr; lerp, mul and
    addcmul, sqrt, divide, add eps, addcdiv) and the weight's own, an ulp (2 u) each (ROUNDINGS)."""
    a = g.abs()
    determined = a > 2 * delta
    bound = LR * ADAM_EPS * delta / (a - delta).clamp(min=delta) ** 2 + ROUNDINGS * 2 * U32 * (LR + w.abs())
    return determined, bound


def test_fsdp_on_two_ranks_gives_the_one_process_step(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ones = [_step(LOCAL, micro, lora) for micro, lora in CASES]
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    for case, one in enumerate(ones):
        lead, other = ranks[0][case], ranks[1][case]
        assert "weights" not in other  # only rank 0 holds an unsharded copy
        largest = max(float(g.abs().max()) for g in one["grads"].values())
        assert largest > 0 and one["norm"] > CLIP
        delta, means = tolerances(ODD, one["shape"], one["grads"])
        assert one["grads"].keys() == lead["grads"].keys()
        for name, g in one["grads"].items():
            assert torch.equal(lead["grads"][name], other["grads"][name]), name  # every rank: the same gradient
            assert _within(lead["grads"][name], g, delta), (CASES[case], name)
        # the norm is the gradient's before the clip (which scaled it by CLIP / norm): two norms differ by at most
        # the two gradients' distance (triangle inequality), plus the rounding of their own sums of squares
        apart = sum(float((lead["grads"][n] - g).pow(2).sum()) for n, g in one["grads"].items()) ** 0.5
        entries = sum(g.numel() for g in one["grads"].values())
        assert lead["norm"] == other["norm"]
        assert abs(lead["norm"] - one["norm"]) <= apart * one["norm"] / CLIP + 2 * gamma(entries) * one["norm"]
        assert lead["loss"] == pytest.approx(one["loss"], rel=means, abs=means)
        for key, value in one["metrics"].items():
            assert lead["metrics"][key] == pytest.approx(value, rel=means, abs=means), (CASES[case], key)
        compared = total = 0
        for name, w in one["weights"].items():
            assert torch.equal(lead["weights"][name], lead["shards"][name]), name  # the copy = the shards
            determined, bound = _weight_bound(one["grads"][name], w, delta)
            assert _within(lead["weights"][name][determined], w[determined], bound[determined]), (CASES[case], name)
            compared, total = compared + int(determined.sum()), total + w.numel()
        assert compared >= 0.9 * total, (CASES[case], compared, total)  # nearly every weight is determined
        for i, s in one["state"]["state"].items():
            bounds = _adam_state_bounds(one["grads"][one["names"][int(i)]], delta)
            for k, v in s.items():
                assert _within(lead["state"]["state"][i][k], v, bounds[k]), (CASES[case], i, k)
                assert torch.equal(lead["round_trip"]["state"][i][k], lead["state"]["state"][i][k])
        assert lead["state"]["param_groups"] == one["state"]["param_groups"]


@pytest.mark.parametrize(("parts", "rank", "world", "padding"), [
    (5, 0, 2, 0), (5, 1, 2, 1), (1, 1, 2, 1), (4, 1, 2, 0), (7, 2, 3, 1), (7, 0, 3, 0)])
def test_every_rank_makes_the_same_number_of_passes(parts, rank, world, padding):
    dp = DataParallel(rank, world, same_passes=True)
    assert dp.padding_parts(parts) == padding
    assert len(dp.mine(list(range(parts)))) + padding == -(-parts // world)
    assert DataParallel(rank, world).padding_parts(parts) == 0  # DDP: a pass is no collective


def test_a_model_without_named_layers_is_one_line():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(Exception, match=r"stage 's': `learner: \{strategy: fsdp\}` shards a Hugging Face model's "
                                        r"decoder layers, and Plain names none"):
        data_parallel("fsdp", 0, 2).shard(Plain(), "s")
