"""benchmarks/real_model_trl.py's workers: one run of one tool (TRL's DistillationTrainer or a mopd stage) in its
own process, timed step by step and phase by phase (`worker`, started as `real_model_trl.py --worker SPEC.json`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from _real_model_setup import LR, resolved, write_recipe


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


class _Finished(Exception):
    """Raised after the stage's last step: its final eval and checkpoint are no part of the step."""


def _worker_mopd(spec: dict) -> dict:
    """One run of a mopd stage through `stages.run.run_stage`, timed by phase; see the module docstring."""
    import torch

    import mopd.sampling.sampler as sampler_mod
    import mopd.stages.mopd as stage_mod
    import mopd.stages.rl as rl_mod
    from mopd.runtime import keep_freed_memory
    from mopd.stages.resolved import StageHooks
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
        ctx = resolved(recipe, out / "run", hooks=StageHooks(progress=on_progress, warn=warnings.append))
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

