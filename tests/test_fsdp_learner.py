"""The data-parallel learner with `strategy: fsdp` (`learner.sharded`): on 2 gloo ranks with the decoder layers
sharded, one MOPD step's summed gradient, clipped norm and AdamW state equal one process's to 1e-6 of their
largest entry, and the updated weights (rank 0's unsharded copy, equal to the shards) to 1e-3 of the learning
rate, with a LoRA student too; the optimizer state gathered
for a checkpoint splits back into the shards exactly (so a stage resumes on any number of ranks); a rank with
fewer micro-batches pads its passes (else the ranks' collectives would not pair up and the step would hang)."""

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
from mopd.models.lora import apply_lora
from mopd.models.tiny import build_tiny_model
from mopd.stages.guards import update_norm

from .test_dp_learner import STAGE, TINY, TOK, panel_and_problems, sample_batch

LR = 1e-2
CLIP = 0.05  # below the step's gradient norm: the clip is exercised
CASES = ((None, False), (5, False), (None, True))  # (micro_batch_size, lora): 11 + 10 rows; 3 + 2 parts; adapters


def _student(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    if lora:
        model = apply_lora(model, LoraSettings(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, p in model.named_parameters():  # B starts at zero: give both factors a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if sharded.is_sharded(t) else t.detach().clone()


def _step(dp: DataParallel | None, micro: int | None, lora: bool) -> dict:
    """One MOPD step with an AdamW update: full gradients, norm, updated weights and optimizer state."""
    student = _student(lora)
    whole = student
    if dp is not None:
        whole = dp.whole = sharded.shard_layers(student, dp, "student")
    panel, problems = panel_and_problems()
    batch = None
    if dp is None or dp.lead:  # rank 0 samples with its unsharded copy, as the stage does
        batch = sample_batch(whole, problems)
    if dp is not None:
        batch = dp.broadcast(batch)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99))
    loss, metrics = policy_loss(student, batch, PolicyConfig(sampling=STAGE, distill=STAGE, teachers=panel),
                                temperature=1.0, micro_batch_size=micro, dp=dp)
    if loss.requires_grad:
        loss.backward()
    if dp is None:
        norm = update_norm(params, CLIP)
    else:
        sharded.sum_gradients(dp, params)
        norm = sharded.update_norm(dp, params, CLIP)
    grads = {n: _full(p.grad) for n, p in student.named_parameters() if p.grad is not None}
    opt.step()
    out = {"grads": grads, "norm": float(norm), "loss": float(loss.detach()), "metrics": metrics}
    if dp is None:
        out["state"] = opt.state_dict()
    else:
        sharded.refresh_whole(dp.whole, student)
        out["shards"] = {n: _full(p) for n, p in student.named_parameters() if p.requires_grad}
        out["state"] = sharded.full_optimizer_state(opt)
        again = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99))
        again.load_state_dict(sharded.sharded_optimizer_state(out["state"], params))
        out["round_trip"] = sharded.full_optimizer_state(again)
    if whole is not None:
        out["weights"] = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
    return out


def _rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save([_step(DataParallel(rank, world, "fsdp"), micro, lora) for micro, lora in CASES], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor, largest: float) -> bool:
    return float((a - b).abs().max()) <= 1e-6 * largest


def test_fsdp_on_two_ranks_gives_the_one_process_step(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ones = [_step(None, micro, lora) for micro, lora in CASES]
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
        assert one["grads"].keys() == lead["grads"].keys()
        for name, g in one["grads"].items():
            assert torch.equal(lead["grads"][name], other["grads"][name]), name  # every rank: the same gradient
            assert _close(lead["grads"][name], g, largest), (CASES[case], name)
        assert lead["norm"] == other["norm"] == pytest.approx(one["norm"], rel=1e-6)
        assert lead["loss"] == pytest.approx(one["loss"], rel=1e-5)
        for key, value in one["metrics"].items():
            assert lead["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (CASES[case], key)
        for name, w in one["weights"].items():
            assert torch.equal(lead["weights"][name], lead["shards"][name]), name  # the copy = the shards
            # AdamW's first update is ~lr * sign(g): where |g| is tiny, g's rounding moves it by up to ~1e-3 lr
            assert float((lead["weights"][name] - w).abs().max()) <= 1e-3 * LR, (CASES[case], name)
        for i, s in one["state"]["state"].items():
            for k, v in s.items():
                assert _close(lead["state"]["state"][i][k], v, float(v.abs().max()) or 1.0), (CASES[case], i, k)
                assert torch.equal(lead["round_trip"]["state"][i][k], lead["state"]["state"][i][k])
        assert lead["state"]["param_groups"] == one["state"]["param_groups"]


@pytest.mark.parametrize(("parts", "rank", "world", "padding"), [
    (5, 0, 2, 0), (5, 1, 2, 1), (1, 1, 2, 1), (4, 1, 2, 0), (7, 2, 3, 1), (7, 0, 3, 0)])
def test_every_rank_makes_the_same_number_of_passes(parts, rank, world, padding):
    dp = DataParallel(rank, world, "fsdp")
    assert sharded.padding_parts(dp, parts) == padding
    assert len(dp.mine(list(range(parts)))) + padding == -(-parts // world)


def test_a_model_without_named_layers_is_one_line():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(Exception, match=r"stage 's': `learner: \{strategy: fsdp\}` shards a Hugging Face model's "
                                        r"decoder layers, and Plain names none"):
        sharded.shard_layers(Plain(), DataParallel(0, 2, "fsdp"), "s")
