"""The in-process teacher panel: one frozen model per teacher, each scoring only the rows routed to it.

It implements `core.scoring.TeacherScorer`, the protocol the learner scores through.

Multi-teacher distillation is routing, not a new algorithm: `route_teachers` maps each row's domain to a
teacher name, the panel runs each teacher once on its own sub-batch, and the routed results are scattered
back into batch order. The panel returns exactly what the objective needs — one logprob per sampled token,
the teacher's top-k, or the full distribution — so the cheap objectives stay cheap.

Every score comes from `logit_blocks`: each routed teacher runs its decoder once over its rows and keeps only its
final hidden states; the LM head then makes the logits of one block of positions at a time (`logit_chunk`
positions; None: all at once), so neither the panel nor the learner's full-distribution loss holds [B, K, V]
teacher logits. One block is the unchunked computation, op for op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..core.batch import RolloutBatch
from ..core.logprobs import aligned_token_logprobs
from ..core.position_blocks import block_bounds, block_rows, row_slice, scatter_rows
from ..core.routing import route_teachers
from ..core.scoring import LogitBlocks
from ..core.vocab_blocks import sampled_token_logprobs
from ..models.forward import LogitHead, final_hidden, plain_weight, shared_prompt_hidden
from .offload import placed_on


@dataclass
class TeacherPanel:
    models: Mapping[str, torch.nn.Module]  # teacher name -> frozen model
    teacher_of_domain: Mapping[str, str]  # domain -> teacher name
    # where teachers score: None = where each one lives (resident); a device = moved there per call, then back
    # (teachers kept on CPU, accelerator memory bounded by student + largest teacher; see teachers/offload.py)
    compute_device: torch.device | None = None
    # positions per block of logits in `sampled_logprobs` and `topk` (None: every position at once); the
    # full-distribution objectives choose their own blocks of `logit_blocks`
    logit_chunk: int | None = None
    # `sampled_logprobs` over every live position at once, this many vocabulary columns at a time, for a teacher
    # with a plain head (`core.vocab_blocks`); None: blocks of `logit_chunk` positions
    vocab_block: int | None = None
    # run each distinct prompt once per teacher and copy its KV cache to the rows that share it (the G rollouts of
    # a group): the same scores up to float rounding, the prompt's decoder pass once instead of G times
    share_prefill: bool = False
    # prompted teachers (`teachers.prompted`): name -> the batch as that teacher reads it (its own prompt rendering
    # before each row's completion); the scores line up with the batch's completion window either way
    reprompt: Mapping[str, Callable[[RolloutBatch], RolloutBatch]] = field(default_factory=dict)

    def _teacher_hidden(
        self, name: str, ids_B_T: torch.Tensor, mask_B_T: torch.Tensor, keep: int, prompt_columns: int = 0
    ) -> tuple[torch.Tensor, LogitHead]:
        """The teacher's final hidden states at the last `keep` positions of its routed rows and its LM head, both
        where it scores. An offloaded teacher goes back to the host after its decoder pass; its head is copied to
        the scoring device for the blocks (one vocabulary projection per routed teacher, not the whole model)."""
        with placed_on(self.models[name], self.compute_device) as model:
            dev = next(model.parameters()).device
            ids_B_T, mask_B_T = ids_B_T.to(dev), mask_B_T.to(dev)
            shared = shared_prompt_hidden(model, ids_B_T, mask_B_T, prompt_columns, keep) if self.share_prefill else None
            hidden, head = shared or final_hidden(model, ids_B_T, mask_B_T, keep=keep)
            if self.compute_device is not None and head.projection is not None:
                head = LogitHead(copy.deepcopy(head.projection), head.final_map)
            return hidden, head

    @staticmethod
    def _routed_rows(batch: RolloutBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A teacher's rows of ids and mask, minus the leading columns that are padding in every one of them.

        Why: the batch is left-padded to its longest prompt; a teacher that gets only its own domain's rows
        (similar prompt lengths) need not run over the other domains' padding. Position ids count real tokens,
        so dropping all-padding columns changes no logit. A teacher that gets every row indexes nothing (no
        copy of the batch). Returns (ids, mask, number of columns dropped).
        """
        every_row = rows.numel() == batch.size  # rows are ascending, so this is arange(B)
        ids = batch.input_ids_B_T if every_row else batch.input_ids_B_T[rows]
        mask = batch.attention_mask_B_T if every_row else batch.attention_mask_B_T[rows]
        start = int(mask.any(0).long().argmax())  # first column with a real token in some row
        return ids[:, start:], mask[:, start:], start

    def route(self, batch: RolloutBatch) -> list[str]:
        return route_teachers(batch.domains, self.teacher_of_domain)

    def chunk_ids(self, batch: RolloutBatch, names_B: list[str]) -> None:
        """None: every in-process teacher of a panel reads the student's tokens (a teacher of another tokenizer
        is a `cross_tokenizer.ForeignTeacher` of a `remote.MixedPanel`)."""
        return None

    def _rows_by_teacher(self, names_B: list[str]) -> dict[str, torch.Tensor]:
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names_B):
            rows.setdefault(name, []).append(i)
        return {name: torch.tensor(idx, dtype=torch.long) for name, idx in rows.items()}

    @torch.no_grad()
    def logit_blocks(self, batch: RolloutBatch, names_B: list[str], keep: int) -> LogitBlocks:
        """The routed teacher's logits at the last `keep` positions of the batch, one block at a time
        (`core.scoring.TeacherScorer.logit_blocks`). Each teacher's decoder runs now, once, over its own rows
        (minus their all-padding columns); a block applies each teacher's head to its rows' slice."""
        return _RoutedBlocks(self._routed_parts(batch, names_B, keep), batch.size, batch.input_ids_B_T.device)

    def _routed_parts(self, batch: RolloutBatch, names_B: list[str], keep: int) -> list[_Routed]:
        """Each routed teacher's final hidden states at the last `keep` positions of its rows, and its head."""
        parts = []
        first = batch.first_completion_column
        for name, rows in self._rows_by_teacher(names_B).items():
            if name in self.reprompt:
                seen = self.reprompt[name](batch.select(rows.to(batch.input_ids_B_T.device)))
                ids, mask, dropped = self._routed_rows(seen, torch.arange(seen.size))
                start = seen.first_completion_column - dropped
            else:
                ids, mask, dropped = self._routed_rows(batch, rows)
                start = first - dropped
            hidden, head = self._teacher_hidden(name, ids, mask, min(keep, ids.shape[1]), start)
            parts.append(_Routed(rows, hidden, head, keep - hidden.shape[1]))
        return parts

    @torch.no_grad()
    def sampled_logprobs(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor:
        """log pi_T(y_t) of each sampled token under the row's routed teacher: [B, T]."""
        # Only positions that predict a completion token need logits: from the column before the first
        # completion column to the end (the prompt's vocabulary projection is skipped).
        T = batch.input_ids_B_T.shape[1]
        keep = T - batch.first_completion_column + 1
        parts = self._routed_parts(batch, names_B, keep)
        targets_B_W = batch.input_ids_B_T[:, T - keep + 1 :]
        live_B_W = batch.completion_mask_B_T[:, T - keep + 1 :] > 0
        if self.vocab_block is not None and all(plain_weight(p.head) is not None for p in parts):
            lp_B_W = _vocab_logprobs(parts, targets_B_W, live_B_W, self.vocab_block)
        else:
            lp_B_W = _block_logprobs(_RoutedBlocks(parts, batch.size, batch.input_ids_B_T.device), targets_B_W,
                                     live_B_W, block_bounds(keep, self.logit_chunk))
        return torch.cat([lp_B_W.new_zeros(batch.size, T - lp_B_W.shape[1]), lp_B_W], 1) * batch.completion_mask_B_T

    @torch.no_grad()
    def full_logits(self, batch: RolloutBatch, names_B: list[str], window: int | None = None) -> torch.Tensor:
        """The routed teacher's full next-token logits aligned to tokens: [B, T, V], or for the last `window`
        tokens only ([B, window, V]; column j concerns token T - window + j), in one block.

        For a backend or caller that wants the whole tensor; the objectives read `logit_blocks` instead. A
        completion-only objective passes the completion window: at a real vocabulary the prompt positions'
        projection is most of the pass. A token no position predicts within its teacher's trimmed rows
        (padding, or the first token) gets zeros.
        """
        keep = (batch.input_ids_B_T.shape[1] if window is None else window) + 1
        return self.logit_blocks(batch, names_B, keep)(0, keep)[:, :-1]

    @torch.no_grad()
    def topk(
        self, batch: RolloutBatch, names_B: list[str], k: int, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The routed teacher's top-k logprobs and token ids per position ([B, W, K] each, W = T or `window`, as
        `full_logits`), plus the logprob of each sampled token ([B, T], 0 off the completion): what a remote
        teacher would ship. Computed a block of `logit_chunk` positions at a time."""
        T = batch.input_ids_B_T.shape[1]
        W = T if window is None else window
        blocks = self.logit_blocks(batch, names_B, W + 1)
        tops, ids, sampled = [], [], []
        for start, stop in block_bounds(W + 1, self.logit_chunk):
            n = min(stop, W) - start
            logprobs = blocks(start, stop)[:, :n].log_softmax(-1)
            top_lp, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            tops.append(top_lp)
            ids.append(top_ids)
            y = batch.input_ids_B_T[:, T - W + start : T - W + start + n, None]
            sampled.append(logprobs.gather(-1, y).squeeze(-1))
        sampled_B_W = torch.cat(sampled, dim=1)
        sampled_B_T = torch.cat([sampled_B_W.new_zeros(batch.size, T - W), sampled_B_W], dim=1)
        return torch.cat(tops, dim=1), torch.cat(ids, dim=1), sampled_B_T * batch.completion_mask_B_T


def _block_logprobs(blocks: LogitBlocks, targets_B_W: torch.Tensor, live_B_W: torch.Tensor,
                    bounds: list[tuple[int, int]]) -> torch.Tensor:
    """log pi_T(y) of the routed teachers a block of positions at a time, [B, W]: with several blocks, only the
    rows with a completion token in the block (the others get zeros)."""
    scored = []
    for start, stop in bounds:
        n = min(stop, targets_B_W.shape[1]) - start
        rows = block_rows(live_B_W, start, n, len(bounds) > 1)
        y = row_slice(targets_B_W, rows, slice(start, start + n))
        scored.append(scatter_rows(aligned_token_logprobs(blocks(start, stop, rows)[:, :n], y), rows,
                                   targets_B_W.shape[0]))
    return torch.cat(scored, dim=1)


def _vocab_logprobs(parts: list[_Routed], targets_B_W: torch.Tensor, live_B_W: torch.Tensor,
                    block: int) -> torch.Tensor:
    """Each routed teacher's log pi_T(y) at its rows' live predicting positions, [B, W] (zeros elsewhere): all
    its positions in one matrix, `block` vocabulary columns at a time (`core.vocab_blocks`)."""
    out = torch.zeros(targets_B_W.shape, device=targets_B_W.device)
    W = targets_B_W.shape[1]
    for p in parts:
        weight = plain_weight(p.head)
        assert weight is not None
        dev = p.hidden.device
        rows = p.rows.to(targets_B_W.device)
        live = live_B_W[rows, p.first :]  # the part's predicting positions: keep positions first .. W - 1
        where = live.nonzero(as_tuple=True)
        if not where[0].numel():
            continue
        y = targets_B_W[rows, p.first :][where]
        hidden = p.hidden[:, : W - p.first][(where[0].to(dev), where[1].to(dev))]
        lp = sampled_token_logprobs(hidden, weight, y.to(dev), block).to(out.device, out.dtype)
        out[rows[where[0]], p.first + where[1]] = lp
    return out


@dataclass(frozen=True)
class _Routed:
    rows: torch.Tensor  # the teacher's rows of the batch
    hidden: torch.Tensor  # [b, k, H]: its final hidden states at the last k <= keep positions
    head: LogitHead
    first: int  # the position (of the `keep`) of hidden's first column


class _RoutedBlocks:
    """`logit_blocks` of a panel: block [start, stop) applies each routed teacher's head to the positions of the
    block it has, scattered into batch order (zeros where a teacher's trimmed rows have no position). A single
    teacher over the whole batch and every position returns its block as it is (no scatter copy)."""

    def __init__(self, parts: list[_Routed], size: int, device: torch.device):
        self.parts, self.size, self.device = parts, size, device

    @torch.no_grad()
    def __call__(self, start: int, stop: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        size = self.size if rows is None else rows.numel()
        if len(self.parts) == 1 and self.parts[0].rows.numel() == self.size and self.parts[0].first == 0:
            p = self.parts[0]
            rows = None if rows is None else rows.to(p.hidden.device)
            return p.head(row_slice(p.hidden, rows, slice(start, stop))).to(self.device)
        place = None  # each asked-for row's place in the output (-1: not asked for)
        if rows is not None:
            place = torch.full((self.size,), -1, dtype=torch.long)
            place[rows.cpu()] = torch.arange(size)
        out: torch.Tensor | None = None
        for p in self.parts:
            lo = max(start, p.first)
            if lo >= stop:
                continue
            mine, dest = slice(None), p.rows  # the part's rows to project, and where they go
            if place is not None:
                at = place[p.rows]
                mine = (at >= 0).nonzero().flatten()
                if mine.numel() == 0:
                    continue
                dest = at[mine]
            logits = p.head(p.hidden[mine, lo - p.first : stop - p.first]).to(self.device)
            if out is None:
                out = logits.new_zeros((size, stop - start, logits.shape[-1]))
            out[dest, lo - start :] = logits
        if out is None:  # no teacher has a position in this block: its vocabulary size from one position
            p = self.parts[0]
            V = p.head(p.hidden[:1, :1]).shape[-1]
            out = torch.zeros((size, stop - start, V), device=self.device)
        return out
