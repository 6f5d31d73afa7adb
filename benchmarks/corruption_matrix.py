"""The corruption matrix: every kind of file a run directory holds, truncated, overwritten with garbage, or
deleted, then the same `mopd run` and `mopd report` again. Each case must end recovered (the run finishes and
every stage's weights equal an undamaged run's) or refused in one line, with nothing verified lost.

The run directory is the miniature recipe of the test suite (every stage kind that trains, a teacher that keeps
snapshots), finished, plus a copy whose MOPD stage was cut after its resumable checkpoints (so those files are in
the matrix too). One file per kind: the kind is the path with the stage name replaced by <stage>.

    .venv/bin/python benchmarks/corruption_matrix.py --json benchmarks/corruption_matrix.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import MINI_RECIPE  # noqa: E402

from mopd.cli import app  # noqa: E402
from mopd.execution.runner import run_recipe  # noqa: E402
from mopd.models.integrity import checkpoint_problem  # noqa: E402
from mopd.recipe.load import load_recipe  # noqa: E402
from mopd.stages import rl as rl_module  # noqa: E402

STAGES = ["base", "sft", "teacher_add", "teacher_rev", "teacher_sort", "student"]
DAMAGES = ("truncate", "garbage", "delete")


def _recipe(path: Path) -> Path:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["teacher_add"]["keep_every"] = 1
    data["stages"]["student"]["checkpoint_every"] = 1
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _quiet_run(recipe: Path, out: Path) -> None:
    run_recipe(load_recipe(recipe), out, Console(file=io.StringIO()))


def _cut_student(recipe: Path, out: Path) -> None:
    """The run stopped during the student's third step: two resumable checkpoints on disk, no final."""
    real, calls = rl_module.policy_loss, {"n": 0}

    def cut(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 2 + 3:  # three teachers x two steps, then the student's third step
            raise KeyboardInterrupt("cut")
        return real(model, *args, **kwargs)

    rl_module.policy_loss = cut
    try:
        _quiet_run(recipe, out)
    except KeyboardInterrupt:
        pass
    finally:
        rl_module.policy_loss = real


def kinds(run: Path) -> dict[str, Path]:
    """kind -> one file of that kind (the student's where it has one, as it is read by most; of resumable
    checkpoints, the newest)."""
    found: dict[str, Path] = {}
    for f in sorted(run.rglob("*"), key=lambda p: (("student" not in p.parts), str(p))):
        if not f.is_file() or ".superseded" in f.parts:
            continue
        rel = f.relative_to(run).as_posix()
        kind = re.sub("^(" + "|".join(STAGES) + ")/", "<stage>/", rel)
        kind = re.sub(r"step-\d+", "step-N", kind)
        if "/checkpoints/" in kind and kind in found and "student" in f.parts:
            found[kind] = max(found[kind], f)  # the newest resumable checkpoint: the one a resume reads
        found.setdefault(kind, f)
    return found


def _damage(f: Path, how: str) -> None:
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "garbage":
        f.write_bytes(os.urandom(max(16, f.stat().st_size)))
    else:
        f.unlink()


def _weights(run: Path) -> dict[str, bytes]:
    return {s: (run / s / "final" / "model.safetensors").read_bytes()
            for s in STAGES if (run / s / "final" / "model.safetensors").exists()}


def one_case(source: Path, recipe: Path, reference: dict[str, bytes], f: Path, how: str, work: Path) -> dict:
    run = work / "case"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(source, run)
    target = run / f.relative_to(source)
    before = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file() and p != target}
    _damage(target, how)
    cli = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cli.invoke(app, ["run", str(recipe), "--out", str(run)])
        rep = cli.invoke(app, ["report", str(run)]) if res.exit_code == 0 else None
    lines = [x for x in res.output.splitlines() if x.startswith(("error:", "warning:"))]
    errors = [x for x in lines if x.startswith("error:")]
    traceback = res.exception is not None and not isinstance(res.exception, SystemExit)
    weights = _weights(run)
    unverified = [s for s in STAGES if (run / s / "final").exists() and checkpoint_problem(run / s / "final")]
    # nothing that was on disk is gone: each other file is where it was, or moved whole into .superseded/
    kept = {p.relative_to(run).as_posix(): p for p in run.rglob("*") if p.is_file()}
    superseded = [p.read_bytes() for p in (run / ".superseded").rglob("*") if p.is_file()] \
        if (run / ".superseded").exists() else []
    lost = [k for k, data in before.items()
            if not _is_output(k) and not (k in kept and kept[k].read_bytes() == data) and data not in superseded]
    if traceback:
        outcome = f"FAILED: traceback {res.exception.__class__.__name__}: {res.exception}"
    elif res.exit_code == 0 and weights == reference and not unverified and rep is not None and rep.exit_code == 0:
        outcome = "recovered"
    elif res.exit_code == 2 and len(errors) == 1:
        outcome = "refused in one line"
    else:
        outcome = f"FAILED: exit {res.exit_code}, {len(errors)} error lines, unverified {unverified}"
    if lost:
        outcome = f"FAILED: lost {lost[:3]}"
    return {"file": f.relative_to(source).as_posix(), "damage": how, "outcome": outcome,
            "said": (errors or [x for x in lines if "verification" in x] or [""])[0][:240]}


def _is_output(rel: str) -> bool:
    """Files a run rewrites by design (its report, run.json, a resumed stage's metrics and checkpoints)."""
    return bool(re.search(r"(^run\.json|^report\.|\.png$|^summary\.json|metrics\.jsonl$|/checkpoints/|"
                          r"^recipe\.yaml|\.mopd\.lock|stage\.json$|preflight\.json$)", rel))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="mopd-corrupt-"))
    recipe = _recipe(work / "mini.yaml")
    finished, cut = work / "finished", work / "cut"
    _quiet_run(recipe, finished)
    _cut_student(recipe, cut)
    reference = _weights(finished)
    cases = [(finished, f) for f in kinds(finished).values()]
    cases += [(cut, f) for k, f in kinds(cut).items() if "/checkpoints/" in k]
    results = []
    for source, f in cases:
        for how in DAMAGES:
            r = one_case(source, recipe, reference, f, how, work)
            results.append(r)
            print(json.dumps(r), flush=True)
    ok = sum(not r["outcome"].startswith("FAILED") for r in results)
    summary = {"cases": len(results), "file_kinds": len(cases), "ok": ok, "results": results}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok == len(results) else 1)


if __name__ == "__main__":
    main()
