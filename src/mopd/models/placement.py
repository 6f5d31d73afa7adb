"""Where a stage's models live and in which precision: `device` and `dtype` of the recipe (or the stage).

auto device: CUDA when torch sees one, else CPU. auto dtype: bfloat16 on a CUDA device that supports it (the
usual precision of the released checkpoints, half the memory), else float32 (CPU bf16 matmuls are slow, and the
tiny models' tests compare exact float32 numbers).
"""

from __future__ import annotations

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return _DTYPES[name]


def stage_placement(stage, recipe) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a stage: its own `device`/`dtype` when set, else the recipe's."""
    device = resolve_device(getattr(stage, "device", None) or recipe.device)
    return device, resolve_dtype(getattr(stage, "dtype", None) or recipe.dtype, device)
