"""FSDP2 for the data-parallel learner (`learner: {workers: W, strategy: fsdp}`): each decoder layer's weights,
gradients and optimizer state are split over the W ranks (torch's `fully_shard`), so the training state of the
layers costs 1/W of a replica per rank. The strategy that uses these is `strategy.FSDP`.

What is sharded, and why not everything: the decoder layers, which hold nearly all of a real model's parameters
(Qwen3-8B: 6.9B of 8.2B), are each one `fully_shard` unit, gathered for their forward and backward by their
own hooks. The embedding, the final norm and the LM head stay replicated and are all-reduced as under DDP:
mopd projects the head a block of positions at a time outside the model's forward (`learner.chunked`,
`learner.fused_head`), where a sharded head's gather hooks would not run.

Rank 0 still samples, evaluates and saves alone (`stages.driver`): it keeps an unsharded copy of the model (the
"whole" model; a colocated rollout engine's copy of the weights, in verl's terms), refreshed from the shards
after every update by one gather of every rank's shards flattened into one buffer (`WholeCopy`). Its optimizer
state and gradients are sharded like every rank's.

Gradients: FSDP2's reduce-scatter averages over the ranks, but each rank's loss parts are already shares of the
whole batch's token mean (`micro_batches.py`), so the step's gradient is their sum: the sharded gradients are
multiplied by W (gloo refuses the pre-multiplied sum FSDP2 would need to sum directly). Every rank must run the
same number of forward/backward passes through the layers (each is a collective), so a rank with fewer
micro-batches than another runs one of them again at weight 0 (`DataParallel.padding_parts`).

Checkpoints hold the optimizer state of an unsharded AdamW (gathered on save, split again on resume), so a stage
saved by W ranks resumes on any number of ranks, with either strategy.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..core.errors import StageError
from .data_parallel import DataParallel


def layer_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: the modules of the classes its HF class says must not be split
    (`_no_split_modules`, a peft wrapper looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_layers(model: torch.nn.Module, dp: DataParallel, stage: str) -> torch.nn.Module | None:
    """Shard `model`'s decoder layers over the ranks in place; returns rank 0's unsharded copy (None elsewhere)."""
    layers = layer_modules(model)
    if not layers:
        raise StageError(f"stage {stage!r}: `learner: {{strategy: fsdp}}` shards a Hugging Face model's decoder "
                         f"layers, and {type(model).__name__} names none (`_no_split_modules`); use `strategy: ddp`")
    whole = copy.deepcopy(model) if dp.lead else None
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dp.world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    return whole


def is_sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor)


def sum_gradients(dp: DataParallel, params: list[torch.nn.Parameter]) -> None:
    """Every rank's gradient of the step summed: all-reduce for replicated parameters; for sharded ones FSDP2 has
    reduce-scattered the mean over ranks, which times W is the sum (module docstring)."""
    replicated = [p for p in params if not is_sharded(p)]
    if replicated:
        dp.sum_gradients(replicated)
    for p in params:
        if is_sharded(p) and p.grad is not None:
            p.grad.mul_(dp.world)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def update_norm(dp: DataParallel, params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The whole gradient's 2-norm over shards and replicas (`torch.nn.utils.clip_grad_norm_`'s, which cannot mix
    sharded and plain gradients), clipping every gradient to `clip` as it does when set."""
    grads = [p.grad for p in params if p.grad is not None]
    dtype = grads[0].dtype if grads else torch.float32
    sharded = torch.zeros((), dtype=torch.float64, device=params[0].device)
    replicated = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for g in grads:
        squares = _local(g).detach().double().pow(2).sum()
        if isinstance(g, DTensor):
            sharded += squares
        else:
            replicated += squares
    dp.sum_(sharded)
    norm = (sharded + replicated).sqrt().to(dtype)
    if clip:
        scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
        for g in grads:
            _local(g).mul_(scale.to(g.dtype))
    return norm


class WholeCopy:
    """Rank 0's unsharded copy of the trained model, and how it is refreshed after an update: every rank flattens
    its shards of the trained sharded parameters into one byte buffer (the same length on every rank, padded),
    one `gather` brings the W buffers to rank 0, which cuts them back into shards and joins each parameter's
    along dimension 0 (FSDP2's `Shard(0)`); the replicated parameters are rank 0's own. One collective per
    update, instead of one per parameter (`DTensor.full_tensor`); the values are the shards' bytes, exactly.

    The shards' shapes on every rank are exchanged once, here (FSDP2 splits dimension 0 in `torch.chunk`'s
    pieces, so a rank may hold fewer rows than another, or none). Frozen parameters (a LoRA model's base) are
    left out: unchanged since the copy was made."""

    def __init__(self, whole: torch.nn.Module | None, model: torch.nn.Module, dp: DataParallel):
        self.whole, self.dp = whole, dp
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.sharded = [(n, p) for n, p in trained if is_sharded(p)]
        self.replicated = [(n, p) for n, p in trained if not is_sharded(p)]
        assert all(tuple(p.placements) == (Shard(0),) for _, p in self.sharded), "fully_shard's default: Shard(0)"
        self.shapes: list[list[tuple[int, ...]]] = dp.gather([tuple(_local(p).shape) for _, p in self.sharded])
        self.length = max(sum(_nbytes(shape, p.dtype) for shape, (_, p) in zip(mine, self.sharded, strict=True))
                          for mine in self.shapes)

    def refresh(self) -> None:
        """Every rank calls it (a collective); rank 0's copy takes the trained parameters' values."""
        buffers = self._gather() if self.sharded else []
        if self.whole is None:
            return
        target = dict(self.whole.named_parameters())
        with torch.no_grad():
            for name, value in [*self._join(buffers), *self.replicated]:
                target[name].copy_(value)

    def _gather(self) -> list[torch.Tensor]:
        """Every rank's shards as one byte buffer each, on rank 0 (an empty list elsewhere)."""
        flat = torch.cat([_local(p).detach().contiguous().view(-1).view(torch.uint8) for _, p in self.sharded])
        flat = torch.cat([flat, flat.new_zeros(self.length - flat.numel())])
        buffers = [torch.empty_like(flat) for _ in range(self.dp.world)] if self.dp.lead else None
        dist.gather(flat, buffers, dst=0)
        return buffers or []

    def _join(self, buffers: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Each sharded parameter whole again, from the W ranks' byte buffers."""
        offsets = [0] * len(buffers)
        out = []
        for i, (name, p) in enumerate(self.sharded):
            pieces = []
            for rank, buffer in enumerate(buffers):
                shape = self.shapes[rank][i]
                n = _nbytes(shape, p.dtype)
                pieces.append(buffer[offsets[rank]: offsets[rank] + n].clone().view(p.dtype).view(shape))
                offsets[rank] += n
            out.append((name, torch.cat(pieces, dim=0)))
        return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as an unsharded optimizer's `state_dict()` (every rank gathers: a collective)."""
    state = opt.state_dict()
    whole = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
             for i, s in state["state"].items()}
    return {"state": whole, "param_groups": state["param_groups"]}


def sharded_optimizer_state(state: dict[str, Any], params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """An unsharded optimizer's `state_dict()` split like `params` (each rank keeps its own shard: no
    communication), to load into the optimizer of a sharded model."""
    out: dict[int, dict[str, Any]] = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                  if is_sharded(p) and torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    return {"state": out, "param_groups": state["param_groups"]}
