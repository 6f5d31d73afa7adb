"""Refuse at load a stage whose model cannot fit in the memory of the device it trains on.

Why: a recipe with `hidden_size: 100000` passes every schema check, trains the stages before it, and then dies in
the allocator with a traceback (or the kernel's OOM killer ends the process with no message at all). The bytes a
stage needs at the least are known before any compute: its parameters times what training keeps per parameter
(weights, gradient and AdamW's two moments), plus the weights of the teachers it scores with. A stage whose floor
already exceeds the device's total memory cannot run, so it is one line at load; anything below is left to run
(activations depend on batch shapes, and a stage near the limit may still fit).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import RecipeError
from ..core.schema import (
    MergeStage,
    ModelStage,
    MOPDStage,
    OffPolicyFTStage,
    PretrainStage,
    PromptedStage,
    Recipe,
    SamplingSettings,
    TinyModelConfig,
)
from ..models.precision import resolve_placement
from .refs import init_ref, resolve_external, stage_roots
from .tokenizer import scratch_tokenizer, tokenizer_settings, vocab_bound
from .yaml_file import Where

ADAMW_STATE_BYTES = 8  # two float32 moments per trained parameter
# What the whole-batch sampler (`sampling.sampler`) allocates per row and new token before its first step: the new
# tokens' ids (int64), their logprobs and mask (float32 each) and the attention mask over them (int64).
SAMPLER_BYTES_PER_TOKEN = 24


def tiny_parameters(cfg: TinyModelConfig, vocab: int) -> int:
    """Parameters of the tiny model `models.tiny.build_tiny_model` builds (norms included)."""
    head = cfg.hidden_size // cfg.heads
    attention = 2 * cfg.hidden_size * cfg.heads * head + 2 * cfg.hidden_size * cfg.kv_heads * head
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    norms = 2 * cfg.hidden_size + (2 * head if cfg.arch == "qwen3" else 0)  # Qwen3 also normalises q and k
    embeddings = vocab * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.layers * (attention + mlp + norms) + cfg.hidden_size


def _external_parameters(directory: Path) -> int | None:
    """Parameters of the model in a local Hugging Face directory, counted on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(directory))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture this transformers does not know: left to the stage to report
        return None
    return sum(p.numel() for p in model.parameters())


def device_memory(device: torch.device) -> int | None:
    """Total bytes of `device`: a GPU's memory, or this machine's (or its container's limit) for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type != "cpu":
        return None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    return total


def stage_parameters(recipe: Recipe, order: list[str], base: Path) -> dict[str, int]:
    """Parameter count of each stage's model, where it can be known without loading weights (`order`: stages in
    dependency order, so a stage's init is counted before it)."""
    counts: dict[str, int] = {}
    external: dict[str, int | None] = {}
    for name in order:
        s, ref = recipe.stages[name], init_ref(recipe.stages[name])
        if isinstance(s, PretrainStage) and s.model is not None:
            counts[name] = tiny_parameters(s.model, vocab_bound(s.tokenizer or recipe.tokenizer))
        elif ref in counts:
            counts[name] = counts[ref]
        elif ref is not None and ref not in recipe.stages and (path := resolve_external(ref, base)):
            if ref not in external:
                external[ref] = _external_parameters(Path(path)) if Path(path).is_dir() else None
            if external[ref] is not None:
                counts[name] = external[ref]
    return counts


def check_model_memory(recipe: Recipe, order: list[str], base: Path, where: Where,
                       data: dict[str, Any] | None = None, domains: dict[str, Any] | None = None) -> None:
    """One RecipeError when a stage's floor (trained parameters with their gradients and AdamW state, or LoRA's
    frozen weights, plus its teachers' weights; a sampling stage's rollout buffers; the attention mask of a
    padded batch of its data domains' longest prompts) exceeds the total memory of its device. `data`: the
    recipe's data domains, read at load; `domains`: every recipe domain (a BPE built from scratch learns from them)."""
    _check_rollout_buffers(recipe, where)
    _check_prompt_masks(recipe, order, base, data or {}, domains or {}, where)
    counts = stage_parameters(recipe, order, base)
    for name, s in recipe.stages.items():
        if name not in counts or isinstance(s, MergeStage | PromptedStage | ModelStage):
            continue
        placement = resolve_placement(s, recipe)
        total = device_memory(placement.device)
        if total is None:
            continue
        weight_bytes = torch.empty((), dtype=placement.weights_dtype).element_size()
        frozen_bytes = torch.empty((), dtype=placement.compute_dtype).element_size()
        n = counts[name]
        trained = n * frozen_bytes if getattr(s, "lora", None) else n * (2 * weight_bytes + ADAMW_STATE_BYTES)
        teachers = set(s.teachers.values()) if isinstance(s, MOPDStage | OffPolicyFTStage) else set()
        teachers -= set(getattr(s, "teacher_backends", {}))  # on actors or servers: not on this device
        scored = sum(counts.get(t, 0) for t in teachers) * frozen_bytes
        need = trained + scored
        if need > total:
            key = "model" if isinstance(s, PretrainStage) and s.model is not None else "init"
            raise RecipeError(
                f"{where('stages', name, key)}: stage {name!r} needs at least {need / 2**30:.1f} GiB "
                f"({n:,} parameters with their gradients and optimizer state"
                f"{f', plus {len(teachers)} teacher(s)' if teachers else ''}); {placement.device.type} has "
                f"{total / 2**30:.1f} GiB in all"
            )


def _check_rollout_buffers(recipe: Recipe, where: Where) -> None:
    """A sampling stage without rollout workers samples all batch_size x group_size rows at once, and its sampler
    allocates their max_new_tokens columns before the first token: `max_new_tokens: 1000000` on a large batch
    would train the stages before it and then stop in the allocator."""
    for name, s in recipe.stages.items():
        if not isinstance(s, SamplingSettings) or s.rollout is not None:
            continue
        rows = s.batch_size * s.group_size
        need = rows * s.max_new_tokens * SAMPLER_BYTES_PER_TOKEN
        device = resolve_placement(s, recipe).device
        total = device_memory(device)
        if total is not None and need > total:
            raise RecipeError(
                f"{where('stages', name, 'max_new_tokens')}: stage {name!r} samples {rows:,} rows (batch_size x "
                f"group_size) of up to {s.max_new_tokens:,} new tokens at once: the sampler's buffers alone are "
                f"{need / 2**30:.1f} GiB; {device.type} has {total / 2**30:.1f} GiB in all"
            )


def _check_prompt_masks(recipe: Recipe, order: list[str], base: Path, data: dict[str, Any],
                        domains: dict[str, Any], where: Where) -> None:
    """A batch of prompts of different lengths is left-padded, and transformers' attention then takes a
    [prompts, 1, P, P] boolean mask (one byte per query-key pair; P the longest prompt in tokens; checked on
    transformers 5): a 20,000-token prompt needs 400 MB of mask for each prompt prefilled beside it. A stage
    prefills its step's batch_size prompts at once (without rollout workers), and every trained stage ends with
    the held-out evaluation, eval.batch_size prompts at once; either mask beyond the device's memory is refused
    here instead of in the allocator after the stages before it trained."""
    lengths = {d: (domain.longest_prompts(), domain.held_out_count()) for d, domain in data.items()
               if callable(getattr(domain, "longest_prompts", None)) and getattr(domain, "local", False)}
    if not lengths:
        return
    roots = stage_roots(recipe.stages, order, base)
    tokenizers: dict[str, Any] = {}
    for name in order:
        s = recipe.stages[name]
        if name not in roots or not hasattr(s, "steps"):
            continue
        device = resolve_placement(s, recipe).device
        if (total := device_memory(device)) is None:
            continue
        train_at_once = s.batch_size if isinstance(s, SamplingSettings) and s.rollout is None else 0
        for d, ((train, held), n_held) in lengths.items():
            for prompt, at_once, key, what in (
                (train, train_at_once if d in (getattr(s, "domains", None) or recipe.domains) else 0,
                 ("stages", name, "batch_size"), "its step prefills"),
                (held, min(recipe.eval.batch_size, recipe.eval.size, n_held), ("eval", "batch_size"),
                 f"the held-out evaluation after stage {name!r} prefills"),
            ):
                # cheap first: no tokenizer makes more tokens than UTF-8 bytes (+ a few special ones)
                if at_once < 2 or at_once * (len(prompt.encode()) + 8) ** 2 <= total:
                    continue
                tokens = _prompt_tokens(prompt, name, roots[name], recipe, domains, tokenizers)
                need = at_once * tokens**2
                if tokens and need > total:
                    raise RecipeError(
                        f"{where(*key)}: {what} {at_once} prompts of domain {d!r} at once, whose longest is "
                        f"{tokens:,} tokens: a padded batch's attention mask alone is {need / 2**30:.1f} GiB "
                        f"({at_once} x {tokens:,}^2 bytes); {device.type} has {total / 2**30:.1f} GiB in all "
                        "(lower the batch size, or drop or shorten the longest prompts)"
                    )


def _prompt_tokens(prompt: str, name: str, root: str, recipe: Recipe, domains: dict[str, Any],
                   cache: dict[str, Any]) -> int:
    """`prompt`'s length in the tokens of stage `name`'s model, which descends from `root` ('scratch': its
    pretrain stage's tokenizer, `recipe.tokenizer.tokenizer_settings`; a local directory or cached Hub id: its
    tokenizer); 0 when that tokenizer is not here."""
    settings = tokenizer_settings(recipe, name) if root == "scratch" else None
    key = settings.model_dump_json() if settings is not None else root
    if key not in cache:
        from transformers import AutoTokenizer

        try:
            cache[key] = scratch_tokenizer(recipe, settings, domains) if settings is not None else (
                AutoTokenizer.from_pretrained(root, local_files_only=True))
        except Exception:  # not here (a Hub id not downloaded): its stage reports it
            cache[key] = None
    tok = cache[key]
    return 0 if tok is None else len(tok(prompt, add_special_tokens=False)["input_ids"])
