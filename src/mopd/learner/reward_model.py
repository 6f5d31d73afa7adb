"""A Bradley-Terry reward model (the `reward_model` stage, InstructGPT's RM): its loss, its scores, its reward.

The model is an HF sequence classifier with one label (`AutoModelForSequenceClassification`, num_labels=1) on a
causal LM's backbone. Its score r(x, y) of a prompt and answer is its output at the last token of the row
`prompt answer [EOS]` (the rows of `supervised.supervised_batch`, left-padded: the EOS, in the last column of
every row). HF's own forward picks the last token that is not `pad_token_id` instead, which is that EOS only
when the pad token is not the EOS: for a tokenizer whose pad token is its EOS (SmolLM2, or any tokenizer
`with_pad_token` gave one) it would read the answer's last token and never see the EOS, so `scores` reads the
last column itself (the same forward, the same head). With the pair's
scores r_c (chosen) and r_r (rejected), the Bradley-Terry model P(chosen > rejected) = sigmoid(r_c - r_r) gives

    loss = -mean_pairs log sigmoid(r_c - r_r)

metrics: accuracy (the fraction of pairs with r_c > r_r) and the mean margin r_c - r_r. As a stage's reward
(`reward: {reward_model: ...}`) an answer gets sigmoid(r) in (0, 1), the rewards' range every consumer expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..envs import Problem
from ..models.prompting import RAW, PromptFormat
from .micro_batches import accumulate_micro_batches
from .rollout import RewardFn
from .supervised import supervised_batch


def bradley_terry_loss(chosen_P: torch.Tensor, rejected_P: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean pair loss of the module docstring over P pairs of scores, and its metrics."""
    margin_P = chosen_P - rejected_P
    value = -F.logsigmoid(margin_P).mean()
    m = margin_P.detach()
    return value, {"loss": float(value.detach()), "rm/accuracy": float((m > 0).float().mean()),
                   "rm/margin": float(m.mean())}


def answer_rows(tokenizer, problems: list[Problem], prompt_format: PromptFormat, device) -> tuple[torch.Tensor, ...]:
    """`prompt answer [EOS]` rows (left-padded) and their attention mask, each Problem's `answer` the answer."""
    ids, attn, _ = supervised_batch(tokenizer, problems, loss_on_prompt=False, prompt_format=prompt_format)
    return ids.to(device), attn.to(device)


def scores(model, ids_B_T: torch.Tensor, attn_B_T: torch.Tensor) -> torch.Tensor:
    """The reward model's scalar score of each row: [B] (with grad when the model has one), its output at the
    row's last column (`answer_rows` are left-padded, so that is every row's EOS; see the module docstring).

    HF's forward run by hand (its backbone, its `score` head over every position, as it computes them) with the
    last column picked instead of the last non-`pad_token_id` one; the same numbers whenever those agree."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA reward model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = getattr(inner, "score", None)
    if not isinstance(backbone, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return model(input_ids=ids_B_T, attention_mask=attn_B_T).logits[:, 0].float()  # not a known layout
    hidden_B_T_H = backbone(input_ids=ids_B_T, attention_mask=attn_B_T).last_hidden_state
    return head(hidden_B_T_H)[:, -1, 0].float()


def reward_model_loss(
    model, tokenizer, chosen: list[Problem], rejected: list[Problem], *, micro_batch_size: int | None = None,
    prompt_format: PromptFormat = RAW,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The Bradley-Terry step over pairs (chosen[i], rejected[i]); a micro-batch holds both rows of its pairs
    (`micro_batch_size` rows, so half as many pairs), each part's mean scaled by its share of the pairs."""
    P = len(chosen)
    dev = next(model.parameters()).device
    ids, attn = answer_rows(tokenizer, [*chosen, *rejected], prompt_format, dev)
    pairs_per_part = None if micro_batch_size is None else max(1, micro_batch_size // 2)

    def part(pairs: slice, share: float):
        rows = torch.cat([torch.arange(pairs.start, pairs.stop), torch.arange(P + pairs.start, P + pairs.stop)])
        r = scores(model, ids[rows.to(dev)], attn[rows.to(dev)])
        n = pairs.stop - pairs.start
        value, metrics = bradley_terry_loss(r[:n], r[n:])
        return value * share, metrics, {}

    value, metrics, _ = accumulate_micro_batches(part, torch.ones(P, 1, device=dev), pairs_per_part)
    metrics["loss"] = float(value.detach())
    return value, metrics


@torch.no_grad()
def pair_accuracy(model, tokenizer, chosen: list[Problem], rejected: list[Problem],
                  prompt_format: PromptFormat = RAW) -> dict[str, float]:
    """Held-out metrics: the fraction of pairs scored chosen > rejected, and the mean margin."""
    if not chosen:
        return {"accuracy": 0.0, "margin": 0.0, "pairs": 0}
    dev = next(model.parameters()).device
    r = scores(model, *answer_rows(tokenizer, [*chosen, *rejected], prompt_format, dev))
    _, metrics = bradley_terry_loss(r[: len(chosen)], r[len(chosen) :])
    return {"accuracy": metrics["rm/accuracy"], "margin": metrics["rm/margin"], "pairs": len(chosen)}


def reward_model_reward(model, tokenizer, prompt_format: PromptFormat = RAW) -> RewardFn:
    """A stage's reward from a frozen reward model: sigmoid(r(prompt, completion)) per row, scored with the
    reward model's own tokenizer and prompt rendering (completions are text)."""

    @torch.no_grad()
    def reward(rows: list[Problem], completions: list[str]) -> list[float]:
        answered = [Problem(prompt=p.prompt, answer=c, domain=p.domain, difficulty=p.difficulty)
                    for p, c in zip(rows, completions, strict=True)]
        dev = next(model.parameters()).device
        return torch.sigmoid(scores(model, *answer_rows(tokenizer, answered, prompt_format, dev))).tolist()

    return reward
