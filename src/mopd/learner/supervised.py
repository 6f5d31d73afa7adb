"""The supervised step (pretrain, sft, and the off-policy trace SFT): token NLL on a batch built from data."""

from __future__ import annotations

import torch

from ..core.batch import ROLE_MODEL, ROLE_PROMPT
from ..envs import Problem
from ..envs.episode import trajectory_ids
from ..models.forward import final_hidden
from ..models.prompting import RAW, PromptFormat
from .chunked import pad_front, token_scores
from .losses import sft_nll_loss
from .micro_batches import accumulate_micro_batches


def supervised_batch(tokenizer, problems: list[Problem], *, loss_on_prompt: bool, prompt_format: PromptFormat = RAW):
    """`prompt answer [EOS]`, left-padded like the sampler's rows; targets are the answer and EOS
    (and the prompt too when `loss_on_prompt`, which is what pretraining on a corpus means). The prompt is
    rendered by `prompt_format`, the sampler's own rendering (`[BOS] prompt`, or the chat template)."""
    rows, targets = [], []
    for p in problems:
        if "trajectory" in p.meta:  # a tool-use problem's gold trajectory: targets on model turns, never observations
            ids, roles = trajectory_ids(tokenizer, prompt_format, p.prompt, p.meta["trajectory"], p.meta.get("tools"))
            rows.append(ids)
            targets.append([0] + [int(r == ROLE_MODEL or (loss_on_prompt and r == ROLE_PROMPT)) for r in roles[1:]])
            continue
        prompt = prompt_format.token_ids(tokenizer, p.prompt)
        sampled = p.meta.get("answer_ids") if p.meta.get("answer_tokenizer") is tokenizer else None
        text_ids = tokenizer(p.answer, add_special_tokens=False).input_ids if sampled is None else sampled
        answer = [*text_ids, tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([0] + [int(loss_on_prompt)] * (len(prompt) - 1) + [1] * len(answer))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width))
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
        target[i, width - len(r) :] = torch.tensor(t, dtype=torch.float)
    return ids, attn, target


def supervised_loss(model, tokenizer, problems: list[Problem], *, loss_on_prompt: bool,
                    micro_batch_size: int | None = None, prompt_format: PromptFormat = RAW,
                    logit_chunk: int | None = None):
    """Token NLL over the targets of `supervised_batch`, a token mean over the whole step (micro-batched when
    `micro_batch_size` is set; see `micro_batches.py`), the logits made `logit_chunk` positions at a time
    (`chunked.py`; None: all at once). Returns (loss, metrics)."""
    dev = next(model.parameters()).device
    ids_B_T, attn_B_T, target_B_T = (
        x.to(dev)
        for x in supervised_batch(tokenizer, problems, loss_on_prompt=loss_on_prompt, prompt_format=prompt_format)
    )

    def part(rows: slice, share: float):
        hidden_b_T_H, head = final_hidden(model, ids_B_T[rows], attn_B_T[rows])
        scores = token_scores(hidden_b_T_H, head, ids_B_T[rows, 1:], logit_chunk, live_B_W=target_B_T[rows, 1:] > 0)
        logprobs_b_T = pad_front(scores["logprobs"], ids_B_T.shape[1])
        nll, _ = sft_nll_loss(logprobs_b_T, target_B_T[rows])
        return nll * share, {}, {}

    loss, _, _ = accumulate_micro_batches(part, target_B_T, micro_batch_size)
    total = float(target_B_T.sum())
    return loss, {"loss": float(loss.detach()), "sft/nll": float(loss.detach()), "sft/num_tokens": total}
