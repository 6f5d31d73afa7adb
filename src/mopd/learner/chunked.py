"""Per-token scores from a block of positions' logits at a time: no step holds [B, K, V] logits (`logit_chunk`).

At a real vocabulary (Qwen3: V = 151,936) the logits of a step's completion positions, in float32 and again in
their log-softmax and their gradient, are most of its memory. Every quantity the objectives need is per token
(a logprob, an entropy, a KL between two next-token distributions), so it can be computed from the final hidden
states one block of positions at a time: the block's logits come from the LM head (`models.forward.LogitHead`),
are reduced to per-token values at once, and are freed. With several blocks each runs under
`torch.utils.checkpoint` (non-reentrant): the autograd graph keeps only the block's slice of the hidden states,
and backward recomputes that block's logits (one more head projection per block, the teacher's included) just
before it differentiates them. So the memory of the logits grows with the block, not with K x V.

One block (a `chunk` of at least the K - 1 predicting positions, or None) is the unchunked computation, op for
op: `head(hidden)` over all K positions, then the same per-token functions, with nothing recomputed. Several
blocks give the same values and gradients up to float rounding (the head's matmul over fewer rows, and the
weight gradient summed over blocks): `tests/test_chunked_objectives.py`.

No head work on padding (issue 17): a row whose completion ended before a block starts has only padding there,
so with several blocks each one projects only the rows with a completion token in it (`live_B_W`), and the others
get zeros (no grad), which every loss masks out. Rollout lengths vary (at a real vocabulary, 1 to 256 tokens
around a mean of 150), so this skips most of the padding's vocabulary projections, in the teacher's blocks too.

Positions: `hidden_B_K_H` holds the last K positions of the rows; position j predicts the token at column
T - K + j + 1, so positions 0 .. K - 2 predict tokens ("predicting positions") and position K - 1 predicts past
the row. Blocks partition the predicting positions; the last block also carries position K - 1 (so that one
block is exactly the K-position projection the unchunked code did), whose logits are dropped. That geometry is
`core.position_blocks`, shared with the teachers' scores, whose blocks must line up with the student's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from ..core.logprobs import (
    aligned_logprobs_and_lse,
    aligned_token_entropy,
    aligned_token_logprobs,
    fused_logprobs_and_entropy,
)
from ..core.position_blocks import block_bounds, block_rows, row_slice, scatter_rows
from ..core.vocab_blocks import sampled_token_head
from ..models.forward import LogitHead, plain_weight

Scores = dict[str, torch.Tensor]
# (the student's logits of predicting positions [start, start + n) as [b, n, V] with grad, start, stop (the
# block's end over the K positions), their target ids [b, n], the batch rows of those b rows (None: every row))
# -> more per-token tensors [b, n]
BlockTerms = Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor | None], Scores]


def over_blocks(block: Callable[[int, int], Scores], bounds: list[tuple[int, int]]) -> Scores:
    """Run `block(start, stop)` over `bounds` and concatenate its per-token tensors along dim 1.

    One block runs as it is. Several run each under non-reentrant checkpointing when autograd records (so only
    their inputs are saved and backward recomputes them), plainly otherwise (no graph to keep).
    """
    if len(bounds) == 1:
        return block(*bounds[0])
    record = torch.is_grad_enabled()
    parts = [
        checkpoint(block, start, stop, use_reentrant=False) if record else block(start, stop)
        for start, stop in bounds
    ]
    return {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}


def token_scores(
    hidden_B_K_H: torch.Tensor,
    head: LogitHead,
    targets_B_W: torch.Tensor,
    chunk: int | None,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    terms: BlockTerms | None = None,
    live_B_W: torch.Tensor | None = None,
    vocab_block: int | None = None,
) -> Scores:
    """Per-token scores of the K - 1 predicting positions, [B, K - 1] each, block by block.

    Args:
        hidden_B_K_H: final hidden states of the last K positions (with grad for the student).
        head: the model's LM head (hidden -> float32 logits).
        targets_B_W: the ids each predicting position scores: the tokens at columns T - K + 1 .. T - 1.
        chunk: predicting positions per block (None: one block).
        temperature: also return "pg_logprobs", log softmax(logits / temperature)[y] (when != 1).
        entropy: also return "entropy" (no grad), the entropy of each position's distribution.
        terms: more per-token tensors from each block's logits (a distribution objective's loss terms).
        live_B_W: which predicting positions score a completion token (bool): with several blocks, a block
            projects only the rows with one among its positions; the others get zeros.
        vocab_block: with no `terms` and a plain head (`models.forward.plain_weight`), score every live
            position at once, this many vocabulary columns at a time (`core.vocab_blocks`; `chunk` unused);
            the other positions get zeros.

    Returns:
        "logprobs" (log softmax(logits)[y], with grad), and what the options add.
    """
    B, K = hidden_B_K_H.shape[:2]
    weight = plain_weight(head) if vocab_block is not None and terms is None else None
    if weight is not None and hidden_B_K_H.dtype == weight.dtype:
        return vocab_scores(hidden_B_K_H, weight, targets_B_W, live_B_W, vocab_block, temperature, entropy)
    bounds = block_bounds(K, chunk)

    def block(start: int, stop: int) -> Scores:
        n = min(stop, K - 1) - start
        rows = block_rows(live_B_W, start, n, len(bounds) > 1)
        logits_b_C_V = head(row_slice(hidden_B_K_H, rows, slice(start, stop)))
        pred_b_N_V = logits_b_C_V[:, :n]
        y_b_N = row_slice(targets_B_W, rows, slice(start, start + n))
        fused = entropy and len(bounds) > 1  # several blocks: equal to the composed functions up to rounding
        if fused:
            logprobs_b_N, entropy_b_N = fused_logprobs_and_entropy(pred_b_N_V, y_b_N)
        else:
            logprobs_b_N, lse_b_N = aligned_logprobs_and_lse(pred_b_N_V, y_b_N)
        out = {"logprobs": logprobs_b_N}
        if temperature != 1.0:
            out["pg_logprobs"] = aligned_token_logprobs((logits_b_C_V / temperature)[:, :n], y_b_N)
        if terms is not None:
            out.update(terms(pred_b_N_V, start, stop, y_b_N, rows))
        if entropy:  # last: a checkpointed block's recompute stops at its last saved tensor, before this metric
            out["entropy"] = entropy_b_N if fused else aligned_token_entropy(pred_b_N_V.detach(), lse_b_N.detach())
        return {key: scatter_rows(x, rows, B) for key, x in out.items()}

    return over_blocks(block, bounds)


def vocab_scores(hidden_B_K_H: torch.Tensor, weight_V_H: torch.Tensor, targets_B_W: torch.Tensor,
                 live_B_W: torch.Tensor | None, block: int, temperature: float, entropy: bool) -> Scores:
    """`token_scores` of the live predicting positions, all in one [N, H] matrix, a block of vocabulary columns
    at a time (`core.vocab_blocks.sampled_token_head`); zeros at the other positions."""
    B, K = hidden_B_K_H.shape[:2]
    live_B_W = targets_B_W.new_ones(targets_B_W.shape, dtype=torch.bool) if live_B_W is None else live_B_W
    where = live_B_W.nonzero(as_tuple=True)
    logprobs, tempered, ent = sampled_token_head(hidden_B_K_H[:, : K - 1][where], weight_V_H, targets_B_W[where],
                                                 block, temperature)

    def place(x_N: torch.Tensor) -> torch.Tensor:
        return x_N.new_zeros(B, K - 1).index_put(where, x_N)

    out = {"logprobs": place(logprobs)}
    if temperature != 1.0:
        out["pg_logprobs"] = place(tempered)
    if entropy:
        out["entropy"] = place(ent)
    return out


def pad_front(x_B_W: torch.Tensor, T: int) -> torch.Tensor:
    """Per-token values of the last W token columns -> [B, T] aligned to input_ids (zeros in front)."""
    return torch.cat([x_B_W.new_zeros(x_B_W.shape[0], T - x_B_W.shape[1]), x_B_W], dim=1)
