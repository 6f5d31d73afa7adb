"""A stage's models as they train and score: tokenizer and prompt rendering, device and precision, LoRA, teachers.

The stage kinds in `run.py` stay short compositions; what changes between a laptop run on tiny models and a GPU
run on Hugging Face checkpoints is decided here, once per stage, from the recipe's `device`, `dtype`,
`master_weights`, `teacher_device`, `chat_template` and the stage's `lora`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ..models.checkpoint import load_model, load_tokenizer
from ..models.lora import apply_lora, load_adapter_into
from ..models.placement import compute_precision, master_dtype, stage_placement, training_attention
from ..models.prompting import set_prompt_format
from ..models.tokenizer import tokenizer_fingerprint
from ..teachers.offload import teachers_fit
from ..teachers.panel import TeacherPanel
from .context import StageContext


def stage_tokenizer(recipe, scratch_tokenizer, init_path: str | None):
    """The tokenizer a stage trains and samples with: its starting model's (the recipe's character tokenizer
    for a model built from scratch), rendering prompts as the recipe's `chat_template` says."""
    tok = scratch_tokenizer if init_path is None else load_tokenizer(init_path)
    return set_prompt_format(tok, recipe.chat_template, recipe.chat_template_kwargs)


def placed(ctx: StageContext, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` on the stage's device, its parameters in `dtype` (default: the stage's compute dtype).

    Only parameters are cast; buffers keep their dtype. Why: transformers keeps a model's RoPE frequencies
    (`rotary_emb.inv_freq`, a non-persistent buffer) in float32 even when it loads the weights in bfloat16, and
    a blanket `model.to(bfloat16)` rounds them to 8 bits of mantissa, which shifts every rotary angle by up to
    ~0.4% of its value, so a model placed that way computes other logits than the same checkpoint loaded by
    `from_pretrained(dtype=bfloat16)` (the teachers here, vLLM, any inference stack).
    """
    device, compute = stage_placement(ctx.settings, ctx.recipe)
    target = dtype or compute
    model.to(device)
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != target:
            p.data = p.data.to(target)
    return model


def load_placed(ctx: StageContext, path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A checkpoint loaded directly in `dtype` (default: the stage's compute dtype; no float32 copy of a large
    model), on the stage's device."""
    _, compute = stage_placement(ctx.settings, ctx.recipe)
    return placed(ctx, load_model(path, dtype=dtype or compute), dtype)


def weights_dtype(ctx: StageContext) -> torch.dtype:
    """The precision of the weights the stage trains (`master_weights`; see models/placement.py)."""
    _, compute = stage_placement(ctx.settings, ctx.recipe)
    return master_dtype(ctx.settings, ctx.recipe, compute)


def training_precision(ctx: StageContext) -> Callable[[], AbstractContextManager]:
    """A factory of the context a stage's forward passes run in: autocast to `dtype` when the trained weights are
    wider. Resolved once per stage, so a step only enters it."""
    device, compute = stage_placement(ctx.settings, ctx.recipe)
    weights = weights_dtype(ctx)
    return lambda: compute_precision(device, compute, weights)


def trainable_model(
    ctx: StageContext, model_factory: Callable[[torch.dtype], torch.nn.Module], resume_from: Path | None
) -> torch.nn.Module:
    """The model a stage trains: resumed from its last checkpoint, else new; with `lora`, adapters on top.

    `model_factory(dtype)` builds or loads the starting model in `dtype`. Fully trained weights are held in
    `weights_dtype`; a LoRA model's frozen base holds the compute dtype and only its adapters are wide.
    A LoRA stage resumes as (starting model + saved adapter), not from the merged weights, so the adapter and
    its optimizer state continue exactly (see models/lora.py).
    """
    weights = weights_dtype(ctx)
    device, compute = stage_placement(ctx.settings, ctx.recipe)
    lora = getattr(ctx.settings, "lora", None)
    if lora is None:
        model = load_placed(ctx, resume_from, weights) if resume_from else placed(ctx, model_factory(weights), weights)
        return training_attention(model, device, compute)
    base = training_attention(placed(ctx, model_factory(compute)), device, compute)
    model = apply_lora(base, lora, adapter_dtype=weights)
    if resume_from:
        load_adapter_into(model, resume_from)
    return model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter, or only the adapters of a LoRA model (base frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


def check_teacher_tokenizers(ctx: StageContext, checkpoints: Iterable[tuple[str, str]]) -> None:
    """Refuse a teacher whose tokenizer differs from the student's, reading tokenizer files only (no weights).

    `checkpoints`: (teacher name, directory) pairs, several per name for a `teacher_schedule`'s phases. Raises the
    preflight's one-line error naming what differs (the CLI prints a PreflightError as one line).
    """
    from ..teachers.preflight import PreflightError, check_tokenizers

    student_tok = load_tokenizer(ctx.init_path) if ctx.init_path else ctx.tokenizer
    student_fp = tokenizer_fingerprint(student_tok)
    for name, ref in checkpoints:
        teacher_tok = load_tokenizer(ref)
        if tokenizer_fingerprint(teacher_tok) != student_fp:
            label = f"stage {ctx.name!r}: teacher {name!r} ({ref})"
            check_tokenizers(student_tok, teacher_tok, label)
            raise PreflightError(f"{label}: uses a different tokenizer from the student")


def load_teachers(
    ctx: StageContext, checkpoints: Mapping[str, str]
) -> tuple[dict[str, torch.nn.Module], torch.device | None]:
    """Frozen teachers and the device they score on (the `compute_device` of a `TeacherPanel`).

    `checkpoints` maps each teacher's name to the directory to load: its final checkpoint, or the snapshot a
    `teacher_schedule` phase names. Every teacher a stage scores with goes through here, so a snapshot gets the
    same precision, placement and tokenizer check as a final teacher.

    teacher_device `same`: resident on the student's device (compute_device None). `cpu`: kept on CPU and moved
    to the student's device per scoring call. `auto`: same if they fit beside the student (`teachers_fit`).
    A teacher whose tokenizer differs from the student's is refused here too, for Hub ids validation could not
    check without downloading.
    """
    check_teacher_tokenizers(ctx, checkpoints.items())
    device, dtype = stage_placement(ctx.settings, ctx.recipe)
    models = {name: load_model(ref, dtype=dtype).eval().requires_grad_(False) for name, ref in checkpoints.items()}
    mode = ctx.recipe.teacher_device
    if mode == "auto":
        biggest = max((sum(p.numel() * p.element_size() for p in m.parameters()) for m in models.values()), default=0)
        mode = "same" if teachers_fit(list(models.values()), device, reserve_bytes=biggest) else "cpu"
    if mode == "same":
        for m in models.values():
            m.to(device)
        return models, None
    return models, device


def teacher_panel(ctx: StageContext, checkpoints: Mapping[str, str]) -> TeacherPanel:
    """The MOPD stage's panel over the teachers loaded from `checkpoints` (see `load_teachers`), routed by the
    stage's `teachers` (domain -> teacher name)."""
    models, compute_device = load_teachers(ctx, checkpoints)
    return TeacherPanel(models=models, teacher_of_domain=ctx.settings.teachers, compute_device=compute_device)


def lazy_rollout_sampler(ctx: StageContext) -> Callable[[], Callable]:
    """A function returning the stage's rollout sampler, built once on first call (a vLLM engine takes GPU
    memory and seconds to start, so it is not built for a stage that resumes already finished)."""
    from ..sampling.backend import choose_backend, rollout_sampler

    built: list[Callable] = []

    def get() -> Callable:
        if not built:
            _, dtype = stage_placement(ctx.settings, ctx.recipe)
            backend = choose_backend(ctx.recipe.rollout_backend)
            built.append(rollout_sampler(backend, init_path=ctx.init_path, tokenizer=ctx.tokenizer, dtype=dtype,
                                         memory_fraction=ctx.recipe.vllm_memory_fraction, seed=ctx.seed))
        return built[0]

    return get
