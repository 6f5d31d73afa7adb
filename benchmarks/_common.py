"""Shared parts of the speed benchmarks: the tiny models, the prompts, and one real mopd training step.

Why one module: the TRL comparison, the multi-teacher timing, the roofline and the profiler must all time the
same models on the same prompts through the same mopd code path (`learner.rollout.rollout`, then
`learner.policy.policy_loss` with a `TeacherPanel`, as `stages/rl.py` runs them, then backward and an AdamW step,
exactly as `stages/driver.py` does), or their figures would not be comparable.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mopd.core.schema import MOPDStage, fixed_micro_batch
from mopd.envs import ALPHABET, Problem, get_domain
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.runtime import keep_freed_memory
from mopd.teachers.panel import TeacherPanel

# Qwen3, character vocabulary (47 tokens): 0.79M and 2.77M parameters.
STUDENT = TinyModelConfig(arch="qwen3", hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate_size=384)
TEACHER = TinyModelConfig(arch="qwen3", hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=640)
# The largest model of the demo recipe (src/mopd/recipes/demo.yaml): every stage has this shape.
DEMO_MODEL = TinyModelConfig(arch="qwen3", hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate_size=384)
DOMAINS = ("reversal", "sorting", "shift")
LR = 3e-4


def build_models(out: Path, n_teachers: int = 1) -> dict[str, Path]:
    """Save the student and `n_teachers` teachers (different seeds) as HF directories under `out`."""
    tok = build_char_tokenizer(ALPHABET)
    paths = {"student": out / "student"}
    build_tiny_model(STUDENT, len(tok), tok, seed=0).save_pretrained(paths["student"])
    for i in range(n_teachers):
        paths[f"teacher{i}"] = out / f"teacher{i}"
        build_tiny_model(TEACHER, len(tok), tok, seed=1 + i).save_pretrained(paths[f"teacher{i}"])
    tok.save_pretrained(out / "tokenizer")
    return paths


def problems(n: int, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> list[Problem]:
    """`n` training problems spread evenly over `domains`, the same for every tool given the seed."""
    rng = random.Random(seed)
    return [get_domain(domains[i % len(domains)]).sample(rng) for i in range(n)]


def mopd_settings(max_new_tokens: int, objective: str) -> MOPDStage:
    """On-policy distillation as the demo's MOPD stage runs it: one rollout per prompt, no GRPO term. (The
    stage's `teachers` are a placeholder: rows are routed by the `TeacherPanel` a step is given.)"""
    return MOPDStage(kind="mopd", init="student", steps=1, teachers={d: "teacher0" for d in DOMAINS},
                     group_size=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, is_mode="truncate",
                     eps_low=0.5, eps_high=2.0, adv_clip=5.0, alpha=0.0, objective=objective)


def policy_step(student, tokenizer, batch: list[Problem], settings: MOPDStage, generator: torch.Generator,
                panel: TeacherPanel) -> tuple[torch.Tensor, dict[str, float]]:
    """mopd's policy step as a MOPD stage runs it (`stages/rl.py`): rollout (sample, reward with each row's domain
    verifier), then the policy loss against `panel`, micro-batched by the settings' `micro_batch_size`."""
    domains = {p.domain: get_domain(p.domain) for p in batch}
    rollouts, metrics = rollout(student, tokenizer, batch, domains, settings, temperature=settings.temperature,
                                generator=generator)
    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)
    loss, loss_metrics = policy_loss(student, rollouts, cfg, temperature=settings.temperature,
                                     micro_batch_size=fixed_micro_batch(settings))
    return loss, {**metrics, **loss_metrics}


def mopd_step_fn(student, teachers: dict[str, torch.nn.Module], tokenizer, settings: MOPDStage,
                 teacher_of_domain: dict[str, str]) -> Callable[[list[Problem], int], dict[str, float]]:
    """One training step as `stages/driver.py` runs it: the policy step, backward, grad clip 1.0, AdamW; in a
    process with the allocator setting that the `mopd` command applies to itself (`mopd.runtime`)."""
    keep_freed_memory()
    for t in teachers.values():
        t.eval().requires_grad_(False)
    panel = TeacherPanel(models=teachers, teacher_of_domain=teacher_of_domain)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.99))

    def step(batch: list[Problem], seed: int) -> dict[str, float]:
        loss, metrics = policy_step(student, tokenizer, batch, settings, torch.Generator().manual_seed(seed), panel)
        if loss.requires_grad:
            loss.backward()
        if any(p.grad is not None for p in student.parameters()):
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return metrics

    return step


def machine() -> str:
    """CPU model, its widest vector unit (torch's dispatch level, plus AMX / AVX512-BF16 where present), cores and
    Python: the figures differ between machines (AMX, AVX512-BF16 or emulated bfloat16 GEMMs), and two of the
    project's machines were both just "AMD EPYC"."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lines = (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in lines}  # the same for every processor listed
        model = fields.get("model name", model)
        flags = set(fields.get("flags", "").split())
    except OSError:
        pass
    units = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")) if flag in flags]
    features = "+".join([torch.backends.cpu.get_cpu_capability(), *units])
    return f"{model} ({platform.machine()}, {features}), {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))
