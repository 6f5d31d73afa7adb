"""The bundled `smol` recipe at full scale: run it (or read a finished run) and record its figures.

    .venv/bin/python benchmarks/smol_recipe.py --out runs/smol            # mopd run smol --threads 2, then record
    .venv/bin/python benchmarks/smol_recipe.py --out runs/smol --no-run   # record a finished run only

Writes `benchmarks/smol_recipe.json`: the machine, each stage's wall time and held-out scores with their standard
errors, the student's recovery of its (prompted) teachers' gains, and the same recovery measured against the RL
teachers, which the student did not learn from (docs/REAL_MODELS.md "The smol recipe").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import machine

from mopd.report.run_files import eval_standard_error

HERE = Path(__file__).resolve().parent
DOMAINS = ("caps", "word_math", "json_record")


def stage_scores(run: Path, stage: str) -> dict[str, dict[str, float]]:
    ev = json.loads((run / stage / "final" / "mopd.json").read_text())["metrics"]["eval"]
    return {d: {"score": v["score"], "se": eval_standard_error(v.get("rewards")), "n": len(v.get("rewards") or [])}
            for d, v in ev.items()}


def recovery(start: float, teacher: float, student: float) -> float | None:
    return None if teacher - start <= 1e-9 else (student - start) / (teacher - start)


def summarize(run: Path) -> dict:
    stages = json.loads((run / "run.json").read_text())["stages"]
    scores = {s: stage_scores(run, s) for s in stages}
    out = {"machine": machine(), "run_dir": str(run), "stages": {
        s: {"kind": st.get("kind"), "wall_seconds": st.get("wall_seconds"), "eval": scores[s]}
        for s, st in stages.items()}}
    for family in ("prompted", "rl"):
        rec = {d: recovery(scores["start"][d]["score"], scores[f"{family}_{d}"][d]["score"],
                           scores["student"][d]["score"]) for d in DOMAINS}
        gains = {d: scores[f"{family}_{d}"][d]["score"] - scores["start"][d]["score"] for d in DOMAINS}
        defined = [r for r in rec.values() if r is not None]
        out[f"against_{family}_teachers"] = {"teacher_gain": gains, "recovery": rec,
                                             "normalized": sum(defined) / len(defined) if defined else None}
    out["wall_seconds"] = sum(st.get("wall_seconds") or 0 for st in stages.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/smol"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="only record a finished run")
    ap.add_argument("--results", type=Path, default=HERE / "smol_recipe.json")
    args = ap.parse_args()
    if not args.no_run:
        mopd = Path(sys.executable).with_name("mopd")
        subprocess.run([str(mopd), "run", "smol", "--threads", str(args.threads), "--out", str(args.out)], check=True)
    result = summarize(args.out)
    args.results.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("against")}, indent=1))


if __name__ == "__main__":
    main()
