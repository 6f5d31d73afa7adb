"""The data-parallel learner (`learner: {workers: W}`): W processes in one torch.distributed group, each holding
the whole model and optimizer, each running a share of the step's micro-batches; their gradients are summed.

Why the same gradient as one worker: a step's loss is a token mean over the whole batch, and every micro-batch's
part is already scaled by its share of the whole batch's loss tokens (`micro_batches.py`), so the sum of the
parts' gradients over all ranks is the one-worker gradient, up to the order of float additions. The batch-wide
parts (advantages, GRPO group statistics, routing) are computed by every rank on the whole batch, which rank 0
samples and broadcasts. Every rank applies the same summed gradient to the same weights with the same
optimizer, so the replicas never drift (gloo's and NCCL's all-reduce give every rank the same sums). Rank 0 alone
writes metrics and checkpoints.

This module is plain torch.distributed (gloo on CPU, NCCL on GPU); who starts the processes and where (Ray actors)
is the executor's business (`recipe.learner_group`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    """This process's place in the learner group (the default process group, initialised by the caller).

    `strategy` "fsdp": the decoder layers are sharded over the ranks (`sharded.py`), and `whole` is rank 0's
    unsharded copy of the model, the one it samples, evaluates and saves (set by the training driver).
    """

    rank: int
    world: int
    strategy: str = "ddp"
    whole: Any = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def sampling_model(self, model: Any) -> Any:
        """The model rank 0 samples with: the trained one, or under FSDP its unsharded copy."""
        return self.whole if self.sharded else model

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

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable object: a rollout batch and its metrics)."""
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
