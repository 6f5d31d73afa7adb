"""The one forward pass every stage uses, so sampling and training see identical positions.

Rows are left-padded prompts followed by right-padded completions; position ids therefore count real tokens
only (cumsum of the attention mask), which makes a row's logits independent of how much padding it got.
"""

from __future__ import annotations

import inspect

import torch


def position_ids_from_mask(attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    return (attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)


def accepts(model, argument: str) -> bool:
    """Whether `model.forward` takes `argument` (HF causal LMs take `logits_to_keep`; other backends may not).

    A peft wrapper's forward takes `**kwargs` and hands them to the model it wraps, so that model's signature
    decides: without this a LoRA student would project every position onto the vocabulary.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters


def sequence_logits(
    model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, logits_to_keep: int = 0
) -> torch.Tensor:
    """Logits [B, T, V] in float32; logits[:, t] predict token t + 1.

    `logits_to_keep > 0` returns only the last `logits_to_keep` positions, [B, K, V]: the backbone still runs
    over every position, but the vocabulary projection (and the float32 copy) skips the prompt, which for a
    real vocabulary is most of a scoring pass's memory.
    """
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep and accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=position_ids_from_mask(attention_mask_B_T),
        use_cache=False,
        **keep,
    )
    logits = out.logits if keep or not logits_to_keep else out.logits[:, -logits_to_keep:]
    return logits.float()
