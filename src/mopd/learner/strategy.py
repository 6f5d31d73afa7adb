"""The learner strategy of a trainable stage: how the model being trained is laid out over processes, and what
that changes in a training step. The training loop (`stages.driver.train`) and the sampling stages' step
(`stages.rl`) call the same methods whatever the layout, so neither has a branch per strategy:

- `Learner` itself: one process (the local executor, or a stage with one learner worker);
- `DDP`: W ranks (`learner: {workers: W}`), each holding the whole model and optimizer, gradients summed
  (`data_parallel.py`);
- `FSDP`: W ranks with the decoder layers sharded (`strategy: fsdp`, `sharded.py`); rank 0 keeps an unsharded
  copy of the model to sample, evaluate and save.

Who backpropagates, one rule for every strategy: a step's loss function returns its loss either still holding
its graph (a step in one part: `backward` here differentiates it, with autocast off) or detached, its parts
already differentiated as they were computed (`micro_batches.accumulate_micro_batches`: a step split into
micro-batches, or shared over ranks, which always is). Either way, after `backward` and `sum_gradients` every
rank's `.grad` holds the whole step's gradient.

Rank 0 (the lead) decides what is not the same computation on every rank: the checkpoint a stage resumes from
and the batch a step trains on are decided there and broadcast (`from_lead`); it alone writes metrics and
checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch

from . import sharded
from .data_parallel import DataParallel
from .micro_batches import backward_outside_autocast

T = TypeVar("T")


class Learner:
    """One process (the local learner; `DDP` and `FSDP` override what W ranks change): the model trained is the
    model sampled, evaluated and saved, and there is nothing to share."""

    group: DataParallel | None = None  # the ranks a step's micro-batches are shared over (`micro_batches.py`)

    @property
    def lead(self) -> bool:
        """Whether this process writes the stage's metrics and checkpoints (and samples: rank 0)."""
        return True

    def from_lead(self, decide: Callable[[], T]) -> T:
        """What rank 0 decides, on every rank: `decide()` runs there only, and its result is broadcast."""
        return decide()

    def shard(self, model: torch.nn.Module, stage: str) -> torch.nn.Module | None:
        """Lay `model` out over the ranks (in place); returns the model rank 0 samples, evaluates and saves (None on
        a rank that holds no such copy)."""
        return model

    def whole(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The unsharded model of the trained `model`: what rank 0 samples with (after `shard`)."""
        return model

    def update(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               clip: float | None) -> tuple[float | None, tuple[str, float] | None]:
        """A step's update from its loss: its backward (not of a non-finite loss), the gradients summed over the
        ranks, their norm (clipped to `clip`), then the optimizer step unless the loss or the norm is not finite.
        Returns the norm (None when the step left no gradient: nothing to learn from, e.g. an offpolicy_ft step
        without a verified trace) and what was not finite (None, or (metric, value)): the caller's guard decides
        whether to stop or skip."""
        bad = None if bool(torch.isfinite(loss.detach()).all()) else ("loss", float(loss.detach()))
        if bad is None:
            self.backward(loss)
        self.sum_gradients(params)  # each rank's share of the micro-batches -> the step's gradient
        if not any(p.grad is not None for p in params):
            return None, bad
        norm = self.update_norm(params, clip)
        if bad is None and not math.isfinite(norm):
            bad = ("grad_norm", norm)
        if bad is None:
            opt.step()
            self.updated()
        opt.zero_grad(set_to_none=True)
        return norm, bad

    def backward(self, loss: torch.Tensor) -> None:
        """The step's backward, where its loss function left it to the caller (module docstring)."""
        if loss.requires_grad:
            backward_outside_autocast(loss)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Each rank's gradient (of its share of the step) summed into the step's gradient, on every rank."""

    def update_norm(self, params: list[torch.nn.Parameter], clip: float | None) -> float:
        """The gradient's total norm (before clipping, as torch reports it), clipping it to `clip` when set."""
        if clip:
            return float(torch.nn.utils.clip_grad_norm_(params, clip))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))

    def updated(self) -> None:
        """After an optimizer step (every rank calls it): bring what rank 0 samples with up to date."""

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state a checkpoint keeps: an unsharded AdamW's, whatever the layout (every rank calls it)."""
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any],
                             params: list[torch.nn.Parameter]) -> None:
        """The inverse of `optimizer_state`, on resume: `state` was saved by any strategy on any number of ranks."""
        opt.load_state_dict(state)


class DDP(Learner):
    """W replicas: every rank holds the whole model and optimizer and takes a share of each step's micro-batches;
    their gradients are summed in one flat all-reduce, so every replica applies the same update."""

    def __init__(self, group: DataParallel):
        self.group = group

    @property
    def lead(self) -> bool:
        return self.group.lead

    def from_lead(self, decide: Callable[[], T]) -> T:
        return self.group.broadcast(decide() if self.group.lead else None)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        self.group.sum_gradients(params)


class FSDP(DDP):
    """W ranks with the decoder layers sharded (FSDP2; embedding and head replicated, summed as under DDP); rank 0
    keeps an unsharded copy, refreshed after every update by one gather (`sharded.WholeCopy`). The optimizer
    state is sharded like the weights, and gathered into an unsharded AdamW's for a checkpoint."""

    def __init__(self, group: DataParallel):
        super().__init__(replace(group, same_passes=True))  # a pass through a sharded layer is a collective
        self.copy: sharded.WholeCopy | None = None

    def shard(self, model: torch.nn.Module, stage: str) -> torch.nn.Module | None:
        whole = sharded.shard_layers(model, self.group, stage)
        self.copy = sharded.WholeCopy(whole, model, self.group)
        return whole

    def whole(self, model: torch.nn.Module) -> torch.nn.Module | None:
        assert self.copy is not None, "FSDP.shard(model) first"
        return self.copy.whole

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        sharded.sum_gradients(self.group, params)

    def update_norm(self, params: list[torch.nn.Parameter], clip: float | None) -> float:
        return float(sharded.update_norm(self.group, params, clip))

    def updated(self) -> None:
        assert self.copy is not None, "FSDP.shard(model) first"
        self.copy.refresh()

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return sharded.full_optimizer_state(opt)

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: dict[str, Any],
                             params: list[torch.nn.Parameter]) -> None:
        opt.load_state_dict(sharded.sharded_optimizer_state(state, params))


STRATEGIES: dict[str, type[DDP]] = {"ddp": DDP, "fsdp": FSDP}
LOCAL = Learner()  # stateless: one instance serves every one-process stage


def data_parallel(strategy: str, rank: int, world: int) -> Learner:
    """Rank `rank` of a `world`-rank learner with the recipe's `learner.strategy` (ddp or fsdp)."""
    return STRATEGIES[strategy](DataParallel(rank, world))
