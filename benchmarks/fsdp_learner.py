"""The data-parallel learner's two strategies on 2 gloo ranks (issue 16, item 4): what a rank holds and what a
step costs, DDP against FSDP2 (`learner: {workers: 2, strategy: ddp|fsdp}`), beside one process.

    .venv/bin/python benchmarks/fsdp_learner.py [--repeats 5] [--layers 8]

One GRPO update (`learner.policy.policy_loss`, backward, the gradient sum, the clipped norm, AdamW, and under
FSDP the refresh of rank 0's unsharded copy) of a Qwen3-architecture student with `--layers` decoder layers of
width 256 on a batch that rank 0 samples once and broadcasts, as `stages/rl.py` does. Per rank it counts the
bytes of the training state it holds (parameters, gradients, AdamW moments: the local shards under FSDP; rank 0's
unsharded copy counted separately) and times the step and its loss + backward (under FSDP that includes the
layers' all-gathers and reduce-scatters; the rest is the gradient sum, norm, AdamW and the copy's refresh):
medians of `--repeats`, after a warm-up. The character
vocabulary makes the decoder layers nearly all the parameters, as in a real model (Qwen3-8B: 84%).
Writes benchmarks/results.json key "fsdp_learner".
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import _common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trl_vs_mopd import update_results

from mopd.core.schema import RLVRStage
from mopd.envs import ALPHABET
from mopd.learner import sharded
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.learner.strategy import FSDP, LOCAL, Learner, data_parallel
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer

SETTINGS = RLVRStage(kind="rlvr", init="x", steps=1, batch_size=8, group_size=4, max_new_tokens=16)
CLIP = 1.0


class Odd:
    """A reward with a GRPO signal on random weights: a completion of odd length passes."""

    def verify(self, problem, completion):
        return float(len(completion) % 2)


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if sharded.is_sharded(t) else t
    return local.numel() * local.element_size()


def _held(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds (local shards under FSDP)."""
    total = sum(_bytes(p) + (_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    return total + sum(_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


def _run(learner: Learner, layers: int, repeats: int) -> dict:
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(arch="qwen3", hidden_size=256, layers=layers, heads=4, kv_heads=2, intermediate_size=768)
    torch.manual_seed(0)
    model = build_tiny_model(cfg, len(tok), tok, seed=0)
    params_total = sum(p.numel() for p in model.parameters())
    whole = learner.shard(model, "student")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    problems = _common.problems(SETTINGS.batch_size, domains=("reversal",))
    domains = {"reversal": Odd()}
    times = []
    for r in range(repeats + 1):

        def sample(r: int = r):
            with torch.no_grad():
                return rollout(whole, tok, problems, domains, SETTINGS, temperature=1.0,
                               generator=torch.Generator().manual_seed(r))[0]

        batch = learner.from_lead(sample)
        if learner.group is not None:
            dist.barrier()
        t0 = time.perf_counter()
        loss, _ = policy_loss(model, batch, PolicyConfig(sampling=SETTINGS), temperature=1.0, dp=learner.group)
        learner.backward(loss)
        t1 = time.perf_counter()
        learner.sum_gradients(params)
        learner.update_norm(params, CLIP)
        opt.step()
        learner.updated()
        held = _held(model, opt)
        opt.zero_grad(set_to_none=True)
        if r:
            times.append((time.perf_counter() - t0, t1 - t0))
    copy = sum(_bytes(p) for p in whole.parameters()) if isinstance(learner, FSDP) and whole is not None else 0
    return {"step seconds": round(_common.median([t for t, _ in times]), 4),
            "of which loss + backward": round(_common.median([b for _, b in times]), 4), "training state MiB": round(held / 2**20, 2),
            "unsharded copy MiB": round(copy / 2**20, 2), "params": params_total, "rows": len(batch.completions)}


def _rank(rank: int, strategy: str, layers: int, repeats: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    random.seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        Path(f"{out}.{rank}").write_text(json.dumps(_run(data_parallel(strategy, rank, 2), layers, repeats)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"one process": _run(LOCAL, args.layers, args.repeats)}
    tmp = Path(tempfile.mkdtemp(prefix="fsdp_learner_"))
    for strategy in ("ddp", "fsdp"):
        out = tmp / strategy
        mp.start_processes(_rank, args=(strategy, args.layers, args.repeats, str(tmp / f"store_{strategy}"),
                                        str(out)), nprocs=2, join=True, start_method="fork")
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
        result[f"{strategy}, 2 gloo ranks"] = {"rank 0": ranks[0], "rank 1": ranks[1]}
    result.update(layers=args.layers, threads_per_rank=1, repeats=args.repeats, machine=_common.machine())
    print(json.dumps(result, indent=2))
    update_results("fsdp_learner", result)


if __name__ == "__main__":
    main()
