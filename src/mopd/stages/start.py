"""The model a trained stage starts from: built from scratch (pretrain with `model:`) or its `init` checkpoint."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.schema import PretrainStage
from ..models.tiny import build_tiny_model
from .loading import load_placed
from .resolved import ResolvedStage


def starting_model(ctx: ResolvedStage) -> Callable[[torch.dtype], torch.nn.Module]:
    """The driver's model factory: dtype -> the stage's starting model, on its device."""
    s = ctx.settings

    def build(dtype: torch.dtype) -> torch.nn.Module:
        if isinstance(s, PretrainStage) and s.model is not None:
            return build_tiny_model(s.model, len(ctx.tokenizer), ctx.tokenizer, ctx.seed)
        return load_placed(ctx, ctx.init_path, dtype)

    return build
