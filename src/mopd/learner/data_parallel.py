"""The ranks of a data-parallel learner (`learner: {workers: W}`): W processes in one torch.distributed group, each
running a share of the step's micro-batches; their gradients are summed. How the model and optimizer are laid out
over them (replicated, or sharded layers) is the learner strategy's business (`strategy.py`); this is what every
strategy shares: who is rank 0, which micro-batches are whose, and the collectives.

Why the same gradient as one worker: a step's loss is a token mean over the whole batch, and every micro-batch's
part is already scaled by its share of the whole batch's loss tokens (`micro_batches.py`), so the sum of the
parts' gradients over all ranks is the one-worker gradient, up to the order of float additions. The batch-wide
parts (advantages, GRPO group statistics, routing) are computed by every rank on the whole batch, which rank 0
samples and broadcasts. Every rank applies the same summed gradient to the same weights with the same
optimizer, so the replicas never drift (gloo's and NCCL's all-reduce give every rank the same sums). Rank 0 alone
writes metrics and checkpoints.

This module is plain torch.distributed (gloo on CPU, NCCL on GPU); who starts the processes and where (Ray tasks)
is the executor's business (`execution.learner_group`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the learner group (the default process group, initialised by the caller).

    `same_passes`: every rank makes the same number of forward/backward passes through the model, a rank with
    fewer micro-batches running one again at weight 0 (`padding_parts`). Needed where a pass is itself a
    collective of every rank (FSDP's sharded layers gather their weights in forward and backward): unpaired
    passes would hang the step.
    """

    rank: int
    world: int
    same_passes: bool = False

    @property
    def lead(self) -> bool:
        """Rank 0: the one that samples, logs and saves."""
        return self.rank == 0

    def chunk_size(self, rows: int, size: int | None) -> int:
        """Rows per micro-batch: the stage's `micro_batch_size`, or (unset) one micro-batch per rank."""
        return size or max(1, math.ceil(rows / self.world))

    def mine(self, chunks: list) -> list[tuple[int, Any]]:
        """This rank's micro-batches with their global index: every world-th one, from its rank."""
        return [(i, c) for i, c in enumerate(chunks) if i % self.world == self.rank]

    def padding_parts(self, parts: int) -> int:
        """How many weight-0 passes this rank adds to its share of `parts` micro-batches (0 without
        `same_passes`), so that every rank runs ceil(parts / W)."""
        if not self.same_passes:
            return 0
        return math.ceil(parts / self.world) - len(range(self.rank, parts, self.world))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object: a rollout batch and its metrics). Rank 0 gets its
        own object back, not a copy."""
        box = [value if self.lead else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients summed, flattened into one all-reduce (a parameter without a gradient on
        every rank contributes zeros, and keeps no gradient if no rank had one)."""
        have = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        self.sum_(have)
        live = [p for p, h in zip(params, have.tolist(), strict=True) if h > 0]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
        self.sum_(flat)
        offset = 0
        for p in live:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sum_metrics(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """Share-weighted metric sums over ranks (each rank's are already scaled by its parts' shares)."""
        keys = sorted({k for ks in self.gather(sorted(metrics)) for k in ks})
        values = torch.tensor([float(metrics.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
        self.sum_(values)
        return dict(zip(keys, values.tolist(), strict=True))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out
