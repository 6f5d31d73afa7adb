"""Run the bundled report recipes (every one, or a subset, at full or a given scale) and write docs/RECIPES.md's
table and benchmarks/recipes.json.

    .venv/bin/python benchmarks/recipes_table.py                          # all of them, full scale
    .venv/bin/python benchmarks/recipes_table.py --recipes r1_zero,olmo3 --threads 1
    .venv/bin/python benchmarks/recipes_table.py --scale 0.05 --no-doc    # a quick look; the doc is left alone

The recipes run one after another into OUT/<name> (`cli_tools.bundled.run_bundled`): a stage whose identity an
earlier recipe finished (the shared base and sft; the shared specialist teachers) is linked, not retrained, so
each recipe's wall time is the sum of its stages' own wall times, wherever they ran. A rerun skips finished
stages; results of recipes run earlier into OUT are kept in the table (`--recipes` adds to them), and so are the
entries of benchmarks/recipes.json (at the same scale) of recipes that OUT does not hold, each with the CPU it was
measured on: `--recipes glm5` on a fresh machine re-measures glm5 and keeps the other rows.

A recipe whose `sft` is not the shared start's (its identity differs from tulu3.yaml's: glm5 trains a fourth
domain, `style`, so it pretrains its own base) is marked "own start" in the table; its normalized score is not
computed (the shared teachers improve another start), and a domain it does not train is "-".

Per recipe: its eval stage's scores for each model it lists, the last being the recipe's result; the result's
per-domain score (mean verifier reward on the 200 held-out prompts) and exact-match accuracy; its normalized
score against the same start and teachers for every recipe (recovery = (result - sft) / (teacher - sft) per
domain, mean over domains; the teachers are the shared specialists `teacher_<domain>` of deepseek_v32 /
mimo_v2_flash, so that number exists once one of those has run); a greedy sample of the result on the longest
held-out prompt of each domain; wall time; the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mopd.cli_tools.bundled import REPORT_RECIPES, run_bundled  # noqa: E402
from mopd.core.schema import EvalStage  # noqa: E402
from mopd.recipe.load import load_recipe  # noqa: E402
from mopd.report.run_files import read_final_eval  # noqa: E402
from mopd.report.scores import normalized_score, recovery  # noqa: E402

START = "sft"
TEACHER = "teacher_{}"
TABLE_BEGIN = "<!-- recipes-table:begin (benchmarks/recipes_table.py writes this part) -->"
TABLE_END = "<!-- recipes-table:end -->"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stage_wall(out: Path, stage: str) -> float:
    """The seconds a stage took where it actually ran (a linked stage: in the run directory it links to)."""
    real = (out / stage).resolve()
    run = json.loads((real.parent / "run.json").read_text())
    return float(run["stages"].get(real.name, {}).get("wall_seconds") or 0.0)


def greedy_samples(model_dir: Path, domains: dict[str, Any], settings) -> dict[str, dict[str, str]]:
    """The model's greedy answer to the longest held-out prompt of each domain (the first of them: a hard one, so
    that the samples tell the recipes apart), beside the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mopd.sampling.sampler import sample

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for name, domain in domains.items():
        problem = max(domain.eval_set(settings.size, seed=settings.seed), key=lambda p: len(p.prompt))
        batch = sample(model, tokenizer, [problem.prompt], max_new_tokens=settings.max_new_tokens, temperature=0.0)
        out[name] = {"prompt": problem.prompt, "answer": batch.completions[0], "reference": problem.answer,
                     "reward": float(domain.verify(problem, batch.completions[0]))}
    return out


def shared_teachers(root: Path, domains: list[str]) -> dict[str, dict]:
    """Each domain's shared teacher's final eval, from any run directory under ROOT that trained it."""
    found: dict[str, dict] = {}
    for run in sorted(root.glob("*/run.json")):
        for d in domains:
            stage = run.parent / TEACHER.format(d)
            if d not in found and (ev := read_final_eval(stage)) and d in ev:
                found[d] = {"stage": str(stage.resolve().relative_to(root.resolve())), "score": ev[d]["score"]}
    return found


def start_identity(name: str, scale: float | None) -> str:
    """The identity of bundled recipe `name`'s `sft` at `scale`, computed from its file (no run needed)."""
    from mopd.cli_tools.bundled import bundled_recipe
    from mopd.cli_tools.scaled import with_scale
    from mopd.recipe.identity import stage_identities

    loaded = load_recipe(bundled_recipe(name), check_tokenizers=False)
    if scale in (None, 1):
        return stage_identities(loaded)[START]
    with tempfile.TemporaryDirectory() as tmp:
        return stage_identities(with_scale(loaded, scale, Path(tmp)))[START]


def summarize(name: str, out: Path, teachers: dict[str, dict], own_start: bool) -> dict[str, Any]:
    loaded = load_recipe(out / "recipe.yaml", check_tokenizers=False)
    recipe = loaded.recipe
    evals = [n for n in loaded.order if isinstance(recipe.stages[n], EvalStage)]
    scores = json.loads((out / evals[-1] / "final" / "eval.json").read_text())
    models = recipe.stages[evals[-1]].models
    result = models[-1]
    table = {m: {d: {"score": r["score"], "accuracy": r["accuracy"]} for d, r in scores[m].items()} for m in models}
    start = read_final_eval(out / START) or {}
    # a domain with no rule-based reward (`style`) has no shared teacher: it is scored, not normalized
    rule_domains = [d for d in recipe.domains if getattr(loaded.domains[d], "rule_reward", True)]
    recoveries = {d: recovery(start.get(d, {}).get("score"), teachers.get(d, {}).get("score"),
                              table[result][d]["score"]) for d in recipe.domains}
    return {
        "recipe": name,
        "scale": recipe.scale,
        "result": result,
        "models": table,
        "start": {d: v["score"] for d, v in start.items()},
        "recovery": recoveries,
        "normalized_score": (normalized_score(recoveries.values())
                             if not own_start and all(d in teachers for d in rule_domains) else None),
        "own_start": own_start,
        "cpu": cpu_model(),
        "samples": greedy_samples(out / result / "final", loaded.domains, recipe.eval),
        "wall_seconds": round(sum(stage_wall(out, s) for s in loaded.order), 1),
        "stages": len(loaded.order),
    }


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, dict], teachers: dict[str, dict], meta: dict[str, Any]) -> str:
    domains = meta["domains"]
    head = ["recipe", "result stage", *[f"{d} score (acc)" for d in domains], "normalized", "wall (s)"]
    cpus: dict[str, list[str]] = {}
    for name, r in results.items():
        cpus.setdefault(r.get("cpu") or meta["cpu"], []).append(name)
    where = "; ".join(f"{cpu} ({', '.join(names)})" if len(cpus) > 1 else cpu for cpu, names in cpus.items())
    lines = [
        f"Measured on {where} ({meta['cores']} cores), torch threads: {meta['threads']}, scale "
        f"{meta['scale']:g}; wall times depend on the machine and its load (see below), so they are only roughly "
        "comparable. Score: mean verifier reward over 200 held-out prompts per domain (the rule measure for "
        "`style`, which training never sees; exact-match accuracy in brackets); normalized: mean over domains of "
        "(result - sft) / (teacher - sft) over the domains with a rule-based reward (`style` has no teacher), with "
        "the same sft and teachers for every recipe on the shared start.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    start = next((r["start"] for r in results.values() if not r.get("own_start")), {})
    lines.append("| *start: sft* | sft | " + " | ".join(fmt(start.get(d)) for d in domains) + " | 0 | |")
    if teachers:
        lines.append("| *teachers* | teacher_&lt;domain&gt; | "
                     + " | ".join(fmt(teachers.get(d, {}).get("score")) for d in domains) + " | 1 | |")
    for name, r in results.items():
        final = r["models"][r["result"]]
        cells = [f"{fmt(final[d]['score'])} ({fmt(final[d]['accuracy'], 2)})" if d in final else "-" for d in domains]
        label = f"{name} (own start)" if r.get("own_start") else name
        lines.append(f"| {label} | {r['result']} | " + " | ".join(cells)
                     + f" | {fmt(r['normalized_score'])} | {r['wall_seconds']:.0f} |")
    lines += ["", "Every model each recipe's eval stage scores (score per domain):", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"{m} " + "/".join(fmt(v[d]['score'], 2) for d in domains if d in v) for m, v in r["models"].items()))
    lines += ["", "Greedy samples of each result (prompt -> answer, reference in brackets):", ""]
    for name, r in results.items():
        lines.append(f"- **{name}**: " + "; ".join(
            f"`{s['prompt']}` -> `{s['answer']}` (`{s['reference']}`)" for s in r["samples"].values()))
    return "\n".join(lines) + "\n"


def earlier_entries(path: Path, scale: float, measured: set[str]) -> dict[str, Any] | None:
    """benchmarks/recipes.json's entries at `scale` for recipes not measured in this run's directory."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if float(data.get("meta", {}).get("scale", 1.0)) != scale:
        return None
    data["recipes"] = {n: r for n, r in data.get("recipes", {}).items() if n not in measured}
    return data


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Recipes\n\n{TABLE_BEGIN}\n{TABLE_END}\n"
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{doc}: no {TABLE_BEGIN} ... {TABLE_END} markers to write the table between")
    before, rest = text.split(TABLE_BEGIN, 1)
    after = rest.split(TABLE_END, 1)[1]
    doc.write_text(f"{before}{TABLE_BEGIN}\n{table}{TABLE_END}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(REPORT_RECIPES), help="comma-separated bundled recipe names")
    ap.add_argument("--scale", type=float, default=None, help="run them at this scale (default: full)")
    ap.add_argument("--out", type=Path, default=None, help="runs directory (default runs/recipes[-scale<s>])")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "recipes.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "RECIPES.md")
    ap.add_argument("--no-doc", action="store_true", help="write neither the JSON nor the doc (a quick look)")
    args = ap.parse_args()
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if unknown := [n for n in names if n not in REPORT_RECIPES]:
        raise SystemExit(f"--recipes: unknown {unknown}; bundled report recipes: {', '.join(REPORT_RECIPES)}")
    import torch
    from rich.console import Console

    from mopd.execution.runner import run_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    scale = args.scale
    root = args.out or ROOT / "runs" / ("recipes" if scale in (None, 1) else f"recipes-scale{scale:g}")
    console = Console()
    # recipes run earlier into ROOT first, so their finished stages are linked rather than retrained
    earlier = [n for n in REPORT_RECIPES if (root / n / "run.json").exists() and n not in names]
    run_bundled(names, root, lambda loaded, out: run_recipe(loaded, out, console), scale=scale,
                earlier=[root / n for n in earlier])
    done = [n for n in REPORT_RECIPES if (root / n / "run.json").exists()]
    shared = start_identity("tulu3", scale)
    domains: list[str] = []
    for n in done:
        domains += [d for d in load_recipe(root / n / "recipe.yaml", check_tokenizers=False).recipe.domains
                    if d not in domains]
    teachers = shared_teachers(root, domains)
    results = {n: summarize(n, root / n, teachers, own_start=start_identity(n, scale) != shared) for n in done}
    kept = earlier_entries(args.json, scale or 1.0, set(done))
    if kept:
        teachers = teachers or kept["teachers"]
        for r in kept["recipes"].values():
            r.setdefault("cpu", kept["meta"]["cpu"])
            r.setdefault("own_start", False)
            domains += [d for d in r["models"][r["result"]] if d not in domains]
        results = {n: results.get(n) or kept["recipes"][n] for n in REPORT_RECIPES if n in results or n in kept["recipes"]}
    meta = {"domains": domains, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "scale": scale or 1.0, "root": str(root),
            "not_run": [n for n in REPORT_RECIPES if n not in results]}
    table = markdown(results, teachers, meta)
    print(table)
    if args.no_doc:
        return
    args.json.write_text(json.dumps({"meta": meta, "teachers": teachers, "recipes": results}, indent=1) + "\n")
    write_doc(args.doc, table)
    print(f"wrote {args.json} and {args.doc}")


if __name__ == "__main__":
    main()
