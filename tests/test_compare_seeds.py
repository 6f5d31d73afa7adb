"""`mopd compare` over seeds, end to end on a miniature recipe (seconds): `seeds:` in the recipe runs each seed
in RUN/seed-<s>/, stages that pin their own seed are trained once and shared, and the combined table carries
intervals computed from the per-prompt rewards the final evaluations record."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mopd.cli import app

from .mini_compare import recipe

PINNED = recipe(
    """\
    student: {kind: mopd, init: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, steps: 2,
              batch_size: 2, group_size: 2, eval_every: 1}
    avg: {kind: merge, base: sft, models: [teacher_rev, teacher_sort]}
    """,
    """\
    compare:
      start: sft
      teachers: {reversal: teacher_rev, sorting: teacher_sort}
      methods: {MOPD: student, Average merge: avg}
    """,
).replace("seed: 0\n", "seed: 0\nseeds: 2\n", 1)
# the start and the teachers pin their seed: a fixed testbed, shared by every seed of the methods
for name in ("sft", "teacher_rev", "teacher_sort"):
    PINNED = PINNED.replace(f"{name}: {{kind: ", f"{name}: {{seed: 0, kind: ")
PINNED = PINNED.replace("    steps: 4\n    batch_size: 12\n", "    steps: 4\n    batch_size: 12\n    seed: 0\n", 1)


def test_compare_over_two_seeds_shares_pinned_stages_and_reports_intervals(tmp_path: Path) -> None:
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    path.write_text(PINNED)
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    s0, s1 = out / "seed-0", out / "seed-1"
    shared = {"base", "sft", "teacher_rev", "teacher_sort"}
    for s in shared:
        assert (s1 / s).is_symlink() and (s1 / s).resolve() == (s0 / s).resolve()
    runs = [json.loads((d / "run.json").read_text()) for d in (s0, s1)]
    assert runs[1]["seed"] == 1 and {runs[1]["stages"][s]["status"] for s in shared} == {"cached"}
    assert runs[0]["stages"]["student"]["identity"] != runs[1]["stages"]["student"]["identity"]
    assert runs[1]["stages"]["student"]["status"] == "ran"

    # the per-prompt rewards the evaluation records average to the score it always recorded
    ev = json.loads((s0 / "student" / "final" / "mopd.json").read_text())["metrics"]["eval"]
    for d in ("reversal", "sorting"):
        assert len(ev[d]["rewards"]) == 8 and sum(ev[d]["rewards"]) / 8 == ev[d]["score"]

    result = json.loads((out / "compare.json").read_text())
    assert result["intervals"]["seeds"] == 2 and result["intervals"]["prompts"] == {"reversal": 8, "sorting": 8}
    assert result["seed_dirs"] == ["seed-0", "seed-1"]
    per_seed = [json.loads((d / "compare.json").read_text()) for d in (s0, s1)]
    mopd = result["methods"]["MOPD"]
    assert mopd["domains"]["reversal"]["score"] == (per_seed[0]["methods"]["MOPD"]["domains"]["reversal"]["score"]
                                                    + per_seed[1]["methods"]["MOPD"]["domains"]["reversal"]["score"]) / 2
    cell = mopd["domains"]["reversal"]["score_interval"]
    assert cell["ci"][0] <= mopd["domains"]["reversal"]["score"] <= cell["ci"][1] and cell["se"] >= 0
    assert set(result["start"]["intervals"]) == {"reversal", "sorting"}
    assert mopd["samples"] == 2 * 2 * 2
    # a tiny teacher may not beat the start: then recovery, and so the curve, is undefined
    assert bool(result["sample_efficiency"]["MOPD"]) == (mopd["normalized_score"] is not None)
    md = (out / "compare.md").read_text()
    assert "| vs MOPD |" in md and "## Per seed" in md and "2 seeds" in md
    for d in (out, s0, s1):
        assert (d / "compare_bars.png").stat().st_size > 0 and (d / "sample_efficiency.png").stat().st_size > 0

    again = CliRunner().invoke(app, ["compare", str(path), "--out", str(out), "--seeds", "2"])
    assert again.exit_code == 0, again.output
    assert {s["status"] for s in json.loads((s1 / "run.json").read_text())["stages"].values()} == {"cached"}


def test_a_method_that_fails_leaves_a_hole_in_the_table_not_a_lost_comparison(tmp_path: Path) -> None:
    """MOPD refused by its teacher gate in every seed: the other method still runs in both seeds, the combined
    table is written with MOPD as n/a, and the command ends non-zero with one line per seed naming the stage."""
    path, out = tmp_path / "mini.yaml", tmp_path / "out"
    gated = PINNED.replace("eval_every: 1}", "eval_every: 1, preflight: {min_teacher_gain: 0.99}}", 1)
    assert gated != PINNED
    path.write_text(gated)
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = res.output[res.output.index("error:"):]
    assert "seed-0: stage 'student'" in errors and "seed-1: stage 'student'" in errors
    result = json.loads((out / "compare.json").read_text())
    assert result["methods"]["MOPD"]["normalized_score"] is None
    for seed_dir in ("seed-0", "seed-1"):
        assert (out / seed_dir / "avg" / "final").is_dir() and not (out / seed_dir / "student" / "final").exists()
    assert "Average merge" in (out / "compare.md").read_text()
