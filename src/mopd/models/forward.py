"""The one forward pass every stage uses, so sampling and training see identical positions.

Rows are left-padded prompts followed by right-padded completions; position ids therefore count real tokens
only (cumsum of the attention mask), which makes a row's logits independent of how much padding it got.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    return (attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logits(model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] in float32; logits[:, t] predict token t + 1."""
    out = model(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=position_ids_from_mask(attention_mask_B_T),
        use_cache=False,
    )
    return out.logits.float()
