"""A panel whose teachers score in other processes (Ray actors, HTTP servers), beside in-process ones.

It implements `core.scoring.TeacherScorer` like `teachers.panel.TeacherPanel`, and composes it: the rows routed
to in-process teachers go to a `TeacherPanel`, the rows of every other teacher to its `RemoteTeacher`. Each call
first starts every remote teacher on its own rows (an actor call or HTTP requests in flight), then scores the
in-process rows, then waits: all teachers score their sub-batches at the same time. Results are scattered back
into batch order, so the learner cannot tell where a teacher ran.

A remote teacher ships whole results: sampled-token logprobs [b, T], top-k [b, W, k], or the logits of the last
`keep` positions [b, keep, V] (the last is what `logit_blocks` costs over the wire: it cannot keep hidden states
on this side; HTTP teachers refuse it at load).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..core.batch import RolloutBatch
from ..core.routing import route_teachers
from ..core.scoring import LogitBlocks
from .panel import TeacherPanel

Pending = Callable[[], object]  # waits for a started call and returns its result


class RemoteTeacher(Protocol):
    """One teacher scored outside this process. Each method starts scoring `batch` (only this teacher's rows,
    all of the batch's columns) and returns a function that waits for the result, on the CPU."""

    def sampled(self, batch: RolloutBatch) -> Pending:
        """-> log pi_T(y_t) of each token, [b, T], 0 off the completion (as `TeacherPanel.sampled_logprobs`)."""
        ...

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        """-> (top-k logprobs [b, W, k], their ids [b, W, k], sampled-token logprobs [b, T]) (as
        `TeacherPanel.topk` with `window`)."""
        ...

    def logits(self, batch: RolloutBatch, keep: int) -> Pending:
        """-> next-token logits at the last `keep` positions, [b, keep, V] (`logit_blocks(...)(0, keep)`; a teacher
        of another tokenizer: in the student's vocabulary, -inf off the shared tokens and the single-token chunks,
        `core.scoring`)."""
        ...


@dataclass
class MixedPanel:
    local: TeacherPanel | None  # the in-process teachers (None: every teacher is remote)
    remote: Mapping[str, RemoteTeacher]  # teacher name -> where it scores
    teacher_of_domain: Mapping[str, str]

    def route(self, batch: RolloutBatch) -> list[str]:
        return route_teachers(batch.domains, self.teacher_of_domain)

    def _split(self, names_B: list[str]) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
        """(rows of in-process teachers or None, [(remote teacher, its rows)])."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names_B):
            rows.setdefault(name if name in self.remote else "", []).append(i)
        local = torch.tensor(rows.pop(""), dtype=torch.long) if "" in rows else None
        return local, [(n, torch.tensor(r, dtype=torch.long)) for n, r in rows.items()]

    def _start(self, batch: RolloutBatch, names_B: list[str], call) -> tuple[torch.Tensor | None, list]:
        """Start `call(teacher, its sub-batch)` on every remote teacher; returns the local rows and
        [(rows, pending)]."""
        local, remote = self._split(names_B)
        cpu = batch.to("cpu") if batch.input_ids_B_T.device.type != "cpu" else batch
        return local, [(rows, call(self.remote[name], cpu.select(rows))) for name, rows in remote]

    def _local_names(self, names_B: list[str], rows: torch.Tensor) -> list[str]:
        return [names_B[i] for i in rows.tolist()]

    @torch.no_grad()
    def sampled_logprobs(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor:
        local, started = self._start(batch, names_B, lambda t, sub: t.sampled(sub))
        out = torch.zeros_like(batch.completion_mask_B_T, dtype=torch.float32)
        if local is not None:
            assert self.local is not None
            out[local.to(out.device)] = self.local.sampled_logprobs(
                batch.select(local.to(batch.input_ids_B_T.device)), self._local_names(names_B, local)).float()
        for rows, wait in started:
            out[rows.to(out.device)] = wait().to(out.device, out.dtype)  # a float64 server's scores, too
        return out

    @property
    def reads_other_tokens(self) -> bool:
        """Whether a teacher of another tokenizer (`cross_tokenizer.ForeignTeacher`) is in the panel."""
        return any(hasattr(t, "chunk_ids") for t in self.remote.values())

    def chunk_ids(self, batch: RolloutBatch, names_B: list[str]) -> torch.Tensor | None:
        """The aligned chunks of the rows of teachers of another tokenizer (`cross_tokenizer.ForeignTeacher`), one
        chunk per token on every other row; None when the panel has no such teacher."""
        if not self.reads_other_tokens:
            return None
        foreign = {n for n, t in self.remote.items() if hasattr(t, "chunk_ids")}
        B, T = batch.completion_mask_B_T.shape
        out = torch.arange(T).repeat(B, 1)
        for name in foreign:
            rows = [i for i, n in enumerate(names_B) if n == name]
            if rows:
                idx = torch.tensor(rows, dtype=torch.long)
                out[idx] = self.remote[name].chunk_ids(batch.select(idx.to(batch.input_ids_B_T.device)))
        return out.to(batch.input_ids_B_T.device)

    @torch.no_grad()
    def topk(
        self, batch: RolloutBatch, names_B: list[str], k: int, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = batch.input_ids_B_T.shape[1]
        W = T if window is None else window
        local, started = self._start(batch, names_B, lambda t, sub: t.topk(sub, k, W))
        parts = []
        if local is not None:
            assert self.local is not None
            sub = batch.select(local.to(batch.input_ids_B_T.device))
            parts.append((local, self.local.topk(sub, self._local_names(names_B, local), k, W)))
        parts += [(rows, wait()) for rows, wait in started]
        dev = batch.input_ids_B_T.device
        lp0, ids0, _ = parts[0][1]
        top_lp = torch.zeros((batch.size, W, lp0.shape[-1]), dtype=torch.float32, device=dev)
        top_ids = torch.zeros((batch.size, W, ids0.shape[-1]), dtype=torch.long, device=dev)
        sampled = torch.zeros((batch.size, T), dtype=torch.float32, device=dev)
        for rows, (lp, ids, s) in parts:
            r = rows.to(dev)
            top_lp[r], top_ids[r], sampled[r] = lp.to(dev).float(), ids.to(dev), s.to(dev).float()
        return top_lp, top_ids, sampled

    @torch.no_grad()
    def logit_blocks(self, batch: RolloutBatch, names_B: list[str], keep: int) -> LogitBlocks:
        local, started = self._start(batch, names_B, lambda t, sub: t.logits(sub, keep))
        local_blocks = None
        if local is not None:
            assert self.local is not None
            sub = batch.select(local.to(batch.input_ids_B_T.device))
            local_blocks = self.local.logit_blocks(sub, self._local_names(names_B, local), keep)
        remote = [(rows, wait()) for rows, wait in started]
        dev, size = batch.input_ids_B_T.device, batch.size

        def blocks(start: int, stop: int, asked: torch.Tensor | None = None) -> torch.Tensor:
            parts = [(rows, logits[:, start:stop].to(dev)) for rows, logits in remote]
            if local_blocks is not None:
                parts.append((local, local_blocks(start, stop)))
            V = parts[0][1].shape[-1]
            out = torch.zeros((size, stop - start, V), dtype=parts[0][1].dtype, device=dev)
            for rows, part in parts:
                out[rows.to(dev)] = part.to(out.dtype)
            return out if asked is None else out[asked.to(dev)]  # shipped whole: the subset saves no work here

        return blocks

    @torch.no_grad()
    def full_logits(self, batch: RolloutBatch, names_B: list[str], window: int | None = None) -> torch.Tensor:
        keep = (batch.input_ids_B_T.shape[1] if window is None else window) + 1
        return self.logit_blocks(batch, names_B, keep)(0, keep)[:, :-1]
