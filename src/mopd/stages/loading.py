"""A stage's models as they train and score: loaded onto the stage's device in its precision, LoRA, rollouts.

The stage kinds stay short compositions; what changes between a laptop run on tiny models and a GPU run on
Hugging Face checkpoints is read from the stage's resolved `Placement` (device, compute and weight dtypes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..models.checkpoint import load_model
from ..models.lora import apply_lora, load_adapter_into
from ..models.precision import training_attention
from .resolved import ResolvedStage


def placed(ctx: ResolvedStage, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` on the stage's device, its parameters in `dtype` (default: the stage's compute dtype).

    Only parameters are cast; buffers keep their dtype. Why: transformers keeps a model's RoPE frequencies
    (`rotary_emb.inv_freq`, a non-persistent buffer) in float32 even when it loads the weights in bfloat16, and
    a blanket `model.to(bfloat16)` rounds them to 8 bits of mantissa, which shifts every rotary angle by up to
    ~0.4% of its value, so a model placed that way computes other logits than the same checkpoint loaded by
    `from_pretrained(dtype=bfloat16)` (the teachers here, vLLM, any inference stack).
    """
    target = dtype or ctx.placement.compute_dtype
    model.to(ctx.placement.device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
    return model


def load_placed(ctx: ResolvedStage, path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A checkpoint loaded directly in `dtype` (default: the stage's compute dtype; no float32 copy of a large
    model), on the stage's device."""
    return placed(ctx, load_model(path, dtype=dtype or ctx.placement.compute_dtype), dtype)


def trainable_model(
    ctx: ResolvedStage, model_factory: Callable[[torch.dtype], torch.nn.Module], resume_from: Path | None
) -> torch.nn.Module:
    """The model a stage trains: resumed from its last checkpoint, else new; with `lora`, adapters on top.

    `model_factory(dtype)` builds or loads the starting model in `dtype`. Fully trained weights are held in the
    placement's `weights_dtype`; a LoRA model's frozen base holds the compute dtype and only its adapters are
    wide. A LoRA stage resumes as (starting model + saved adapter), not from the merged weights, so the adapter
    and its optimizer state continue exactly (see models/lora.py).
    """
    p = ctx.placement
    lora = ctx.settings.lora
    if lora is None:
        model = load_placed(ctx, resume_from, p.weights_dtype) if resume_from else \
            placed(ctx, model_factory(p.weights_dtype), p.weights_dtype)
        return training_attention(model, p.device, p.compute_dtype)
    base = training_attention(placed(ctx, model_factory(p.compute_dtype)), p.device, p.compute_dtype)
    model = apply_lora(base, lora, adapter_dtype=p.weights_dtype)
    if resume_from:
        load_adapter_into(model, resume_from)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter, or only the adapters of a LoRA model (base frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


def lazy_rollout_sampler(ctx: ResolvedStage) -> Callable[[], Callable]:
    """A function returning the stage's rollout sampler, built once on first call (a vLLM engine takes GPU
    memory and seconds to start, so it is not built for a stage that resumes already finished)."""
    from ..sampling.backend import choose_backend, rollout_sampler

    built: list[Callable] = []

    def get() -> Callable:
        if not built:
            backend = choose_backend(ctx.rollout_backend)
            built.append(rollout_sampler(backend, init_path=ctx.init_path, tokenizer=ctx.tokenizer,
                                         dtype=ctx.placement.compute_dtype,
                                         memory_fraction=ctx.vllm_memory_fraction, seed=ctx.seed))
        return built[0]

    return get
