"""LoRA adapters through peft (optional: `pip install 'mopd[lora]'`), saved as a plain merged HF model.

Why merged: every later stage, the report and the user open checkpoints with `AutoModelForCausalLM`; a merged
directory needs no peft to load. The adapter alone is written next to it (`adapter/`), which is what a resumed
stage reloads: the stage's starting model plus the saved adapter is exactly the interrupted model, and the
optimizer state (over adapter parameters only) matches it again.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'mopd[lora]'") from None
    return peft


def apply_lora(model, settings, adapter_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Wrap `model` with fresh LoRA adapters (`settings`: r, alpha, dropout, target_modules); base frozen.

    The adapters are created in `adapter_dtype` (default: the base model's dtype), so a bfloat16 base can carry
    float32 adapters whose small updates do not round away.
    """
    peft = _peft()
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    if adapter_dtype is not None:
        for p in wrapped.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
    return wrapped


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(model) -> torch.nn.Module:
    """A plain transformers model with the adapters folded into the weights; `model` is left untouched."""
    return copy.deepcopy(model).merge_and_unload()


def save_adapter(model, path: Path) -> None:
    model.save_pretrained(Path(path) / ADAPTER_DIR)


def load_adapter_into(model, path: Path) -> None:
    """Copy the adapter weights saved under `path/adapter` into a LoRA-wrapped `model` (resume)."""
    peft = _peft()
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(Path(path) / ADAPTER_DIR), device=str(next(model.parameters()).device))
    result = peft.set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: adapter does not match the stage's LoRA settings: {result.unexpected_keys[:3]}")
