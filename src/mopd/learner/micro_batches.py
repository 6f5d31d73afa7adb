"""One generic micro-batch accumulator: a step's forward/backward N rows at a time, with the whole batch's gradient.

Why: at a real vocabulary a step's logits ([B, T, V], float32, and their saved activations) do not fit at once;
run `part(rows, share)` per micro-batch and backpropagate each part as soon as it is computed, so only one
micro-batch's activations are alive. Each part returns its share of the whole step's token mean (the caller
scales by `share`, the micro-batch's fraction of the step's loss tokens), so the accumulated gradient is the
whole batch's up to float rounding (`tests/test_micro_batches.py`). Without micro-batches there is one part, of
share 1, whose loss is returned with its graph: the learner strategy runs its backward (`strategy.Learner.backward`),
as for any loss that still has its graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data_parallel import DataParallel

# part(rows, share) -> (loss, token-mean metrics over the part, detached per-row tensors to keep); rows: a slice,
# or the row indices of a micro-batch when the rows are taken in an `order`
Part = Callable[[slice | torch.Tensor, float], tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]]


def micro_batches(rows: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` rows covering `rows` (one slice of everything when `size` is None)."""
    size = size or max(rows, 1)
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)] or [slice(0, 0)]


def backward_outside_autocast(loss: torch.Tensor) -> None:
    """`loss.backward()` with autocast off, as the training driver runs a whole batch's backward: a micro-batch's
    backward happens inside the step's forward context, and backward ops must not be re-cast."""
    with torch.autocast(device_type=loss.device.type, enabled=False):
        loss.backward()


def accumulate_micro_batches(
    part: Part, tokens_B_T: torch.Tensor, size: int | None, dp: DataParallel | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """Run `part` over the micro-batches of `size` rows of a step whose loss tokens are `tokens_B_T` (rows first).

    With `dp` (the ranks of a data-parallel learner), this rank runs its share of the micro-batches (one per rank
    when `size` is unset; with `dp.same_passes`, FSDP's, a rank with fewer micro-batches runs one again at weight
    0, so every rank makes the same passes through the sharded layers); loss, metrics and kept tensors are then
    the whole step's, summed and gathered over the ranks, and each rank's `.grad` holds its own parts' gradient
    (the learner strategy sums them: `strategy.Learner.sum_gradients`).

    `order` (a permutation of the rows): micro-batches take the rows in that order (`part` gets index tensors),
    and the kept tensors come back in the batch's own row order.

    Returns:
        loss: the whole step's loss; detached (gradients already in `.grad`) when there was more than one part.
        metrics: each part's metrics weighted by its share (so token means over the whole step).
        kept: each part's kept tensors concatenated along rows.
    """
    rows_total = tokens_B_T.shape[0]
    chunks: list = micro_batches(rows_total, size if dp is None else dp.chunk_size(rows_total, size))
    if order is not None:
        chunks = [order[c] for c in chunks]
    split = len(chunks) > 1 or dp is not None
    total = float(tokens_B_T.sum())
    loss = torch.zeros((), device=tokens_B_T.device)
    metrics: dict[str, float] = {}
    kept: list[dict[str, torch.Tensor]] = []
    indexed = list(enumerate(chunks)) if dp is None else dp.mine(chunks)
    for _, rows in indexed:
        share = float(tokens_B_T[rows].sum()) / total if total > 0 else 0.0
        part_loss, part_metrics, part_kept = part(rows, share)
        for k, v in part_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + share * v
        if not split:
            loss = part_loss  # the learner strategy runs its backward (`Learner.backward`)
        else:
            if part_loss.requires_grad:
                backward_outside_autocast(part_loss)
            loss = loss + part_loss.detach()
        kept.append(part_kept)
    if dp is not None:  # with `same_passes`: every rank the same number of passes through the sharded layers
        for _ in range(dp.padding_parts(len(chunks))):
            idle_loss, _, _ = part(chunks[0], 0.0)
            if idle_loss.requires_grad:
                backward_outside_autocast(idle_loss * 0.0)
    if dp is not None:  # the whole step's numbers on every rank, parts in their global order
        loss = dp.sum_(loss.clone())
        metrics = dp.sum_metrics(metrics, loss.device)
        everyone = [pair for ranks in dp.gather([(i, {k: v.cpu() for k, v in p.items()})
                                                for (i, _), p in zip(indexed, kept, strict=True)])
                    for pair in ranks]
        kept = [{k: v.to(loss.device) for k, v in p.items()} for _, p in sorted(everyone, key=lambda x: x[0])]
    joined = {k: torch.cat([p[k] for p in kept]) for k in kept[0]}
    if order is not None:  # back to the batch's row order
        back = torch.argsort(order.to(loss.device))
        joined = {k: v[back] for k, v in joined.items()}
    return loss, metrics, joined
