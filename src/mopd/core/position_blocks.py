"""Index arithmetic of scoring logits a block of positions at a time (`logit_chunk`).

The student's losses (`learner.chunked`, `learner.fused_head`) and the teachers' scores (`teachers.panel`) cut
the same K positions into the same blocks and skip the same padding rows, so that a teacher's block lines up
with the student's block of the same positions. The geometry is shared here, in the bottom layer, rather than
owned by either side: it is pure indexing, with no model or loss in it.

Positions: of K positions, position j predicts the token after it, so positions 0 .. K - 2 predict tokens
("predicting positions") and position K - 1 predicts past the row. Blocks partition the predicting positions;
the last block also carries position K - 1, so that one block is exactly the K-position projection of the
unchunked computation.
"""

from __future__ import annotations

import torch


def block_rows(live_B_W: torch.Tensor | None, start: int, n: int, several: bool) -> torch.Tensor | None:
    """The rows with a completion token among predicting positions [start, start + n), or None for every row:
    when there is one block (the unchunked computation, op for op) or when every row has one."""
    if live_B_W is None or not several:
        return None
    rows = live_B_W[:, start : start + n].any(1).nonzero().flatten()
    return None if rows.numel() == live_B_W.shape[0] else rows


def row_slice(x_B_W: torch.Tensor, rows: torch.Tensor | None, cols: slice) -> torch.Tensor:
    """`x_B_W[rows, cols]`, or every row's `x_B_W[:, cols]` (a view, no copy) when `rows` is None."""
    return x_B_W[:, cols] if rows is None else x_B_W[rows, cols]


def scatter_rows(x_b_N: torch.Tensor, rows: torch.Tensor | None, size: int) -> torch.Tensor:
    """Per-token values of `rows` -> [size, N] in batch order, zeros elsewhere (differentiable wrt `x_b_N`)."""
    if rows is None:
        return x_b_N
    return x_b_N.new_zeros((size, *x_b_N.shape[1:])).index_copy(0, rows, x_b_N)


def block_bounds(positions: int, chunk: int | None) -> list[tuple[int, int]]:
    """Blocks [start, stop) over `positions` positions of which the last predicts nothing: at most `chunk`
    predicting positions each, the last block extended to `positions`. One block when `chunk` is None or at
    least positions - 1."""
    predicting = positions - 1
    if chunk is None or chunk >= predicting:
        return [(0, positions)]
    if chunk <= 0:
        raise ValueError(f"logit_chunk must be positive, got {chunk}")
    starts = list(range(0, predicting, chunk))
    return [(s, e) for s, e in zip(starts, [*starts[1:], positions], strict=True)]
