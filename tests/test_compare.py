"""`mopd compare`: the comparison table's arithmetic on known scores, the bundled recipe's equal budgets, the
`compare:` block's validation, and the command end to end on a miniature recipe (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mopd.cli import app, bundled_recipe
from mopd.experiments.compare_plan import compare_plan
from mopd.models.integrity import sealed_lineage
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe
from mopd.report.compare import build_compare

from .mini_compare import recipe

# ---------------------------------------------------------------------------------------------- arithmetic


def _stage(run: Path, name: str, scores: dict[str, float], rows: list[dict]) -> None:
    (run / name / "final").mkdir(parents=True)
    evals = {d: {"score": v, "accuracy": v} for d, v in scores.items()}
    lineage = sealed_lineage(run / name / "final", {"metrics": {"eval": evals}})
    (run / name / "final" / "mopd.json").write_text(json.dumps(lineage))
    (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_arithmetic_on_known_scores(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _stage(run, "sft", {"a": 0.2, "b": 0.5}, [{"step": 1, "samples": 0}])
    _stage(run, "ta", {"a": 0.6, "b": 0.9}, [{"step": 1, "samples": 64}])
    _stage(run, "tb", {"a": 0.1, "b": 0.7}, [{"step": 1, "samples": 64}])
    _stage(run, "mopd", {"a": 0.5, "b": 0.6}, [
        {"step": 1, "samples": 10, "eval/a": 0.4, "eval/b": 0.5},
        {"step": 2, "samples": 20, "teacher_samples": 0, "eval/a": 0.5, "eval/b": 0.6},
    ])
    _stage(run, "t2", {"a": 0.9, "b": 0.5}, [{"step": 1, "samples": 7}])
    _stage(run, "r2", {"a": 0.6, "b": 0.7}, [{"step": 1, "samples": 5, "eval/a": 0.6, "eval/b": 0.7}])
    _stage(run, "off", {"a": 0.3, "b": 0.5}, [{"step": 1, "samples": 0, "teacher_samples": 30}])
    stages = {s: {"kind": "x", "wall_seconds": w} for s, w in
              {"sft": 1, "ta": 1, "tb": 1, "mopd": 10.0, "t2": 3.5, "r2": 2.0, "off": 4.0}.items()}
    (run / "run.json").write_text(json.dumps({"recipe": "known", "stages": stages,
                                              "report": {"start": "sft", "student": "mopd", "teachers": {}}}))
    plan = {
        "start": "sft", "teachers": {"a": "ta", "b": "tb"}, "curves": ["MOPD", "Round 2"],
        "methods": {
            "MOPD": {"stage": "mopd", "kind": "mopd", "chain": ["mopd"], "extra": []},
            "Round 2": {"stage": "r2", "kind": "mopd", "chain": ["r2", "mopd"], "extra": ["t2"]},
            "Off": {"stage": "off", "kind": "offpolicy_ft", "chain": ["off"], "extra": []},
        },
    }
    result = build_compare(run, plan)
    m = result["methods"]["MOPD"]
    # a: (0.5 - 0.2) / (0.6 - 0.2) = 0.75;  b: (0.6 - 0.5) / (0.7 - 0.5) = 0.5
    assert m["domains"]["a"]["recovery"] == pytest.approx(0.75)
    assert m["domains"]["b"]["recovery"] == pytest.approx(0.5)
    assert m["normalized_score"] == pytest.approx(0.625)
    assert (m["samples"], m["other_samples"], m["wall_seconds"]) == (20, 0, 10.0)
    r2 = result["methods"]["Round 2"]
    assert r2["normalized_score"] == pytest.approx((1.0 + 1.0) / 2)
    assert (r2["samples"], r2["other_samples"], r2["wall_seconds"]) == (25, 7, 15.5)  # chain; t2 is "other"
    off = result["methods"]["Off"]
    assert (off["samples"], off["other_samples"]) == (0, 30)
    assert off["normalized_score"] == pytest.approx((0.25 + 0.0) / 2)
    curve = result["sample_efficiency"]
    # the start (0 samples, 0.0), then each eval record: step 1 = ((0.2/0.4) + 0) / 2
    assert curve["MOPD"] == [pytest.approx([0, 0.0]), pytest.approx([10, 0.25]), pytest.approx([20, 0.625])]
    assert curve["Round 2"] == [pytest.approx([20, 0.625]), pytest.approx([25, 1.0])]  # continues from round 1
    assert "Off" not in curve
    on_disk = json.loads((run / "compare.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    md = (run / "compare.md").read_text()
    assert "| **MOPD** | mopd | 0.500 | 0.600 | 0.750 | 0.500 | **0.625** | 20 | 0 |" in md
    for f in ("compare_bars.png", "sample_efficiency.png"):
        assert (run / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- the bundled recipe


@pytest.mark.parametrize("name", ["compare", "compare_rl_teachers"])
def test_bundled_compare_recipes_have_equal_student_budgets(name: str) -> None:
    loaded = load_recipe(bundled_recipe(name), check_tokenizers=False)
    stages, cmp = loaded.recipe.stages, loaded.recipe.compare
    assert cmp is not None and set(cmp.methods) >= {"MOPD", "Mix-RL", "Cascade RL", "Off-policy FT",
                                                       "Weight-average merge", "Task-arithmetic merge",
                                                       "MOPD round 2"}
    budget = {n: stages[n].steps * stages[n].batch_size * stages[n].group_size
              for n in ("student", "mix_rl", "cascade_rl")}
    assert len(set(budget.values())) == 1, budget
    off = stages["offpolicy_ft"]
    assert off.steps * off.batch_size == budget["student"]  # the same number of traces as MOPD's rollouts
    plan = compare_plan(loaded)
    assert plan["methods"]["MOPD round 2"]["chain"] == ["student_r2", "student"]
    r2 = [f"teacher_{d}_r2" for d in loaded.recipe.domains]
    assert set(r2) <= set(plan["methods"]["MOPD round 2"]["extra"])
    # round 2 as Nemotron 3 Ultra does it: every domain's teacher retrained from the round-1 student, and gated
    for t in r2:
        init = stages[t].init
        assert init == "student" or stages[init].init == "student", (t, init)
    assert stages["student_r2"].preflight.min_teacher_gain == -0.005


def test_bundled_compare_recipe_is_the_demo_with_caesar_for_shift() -> None:
    stages = load_recipe(bundled_recipe("compare"), check_tokenizers=False).recipe.stages
    demo = load_recipe(bundled_recipe("demo"), check_tokenizers=False).recipe.stages
    swap = {"shift": "caesar", "sft_shift": "sft_caesar", "teacher_shift": "teacher_caesar"}

    def renamed(stage):
        data = stage.model_dump()
        for key in ("domains",):
            if data.get(key):
                data[key] = [swap.get(d, d) for d in data[key]]
        if data.get("teachers"):
            data["teachers"] = {swap.get(d, d): swap.get(t, t) for d, t in data["teachers"].items()}
        if data.get("init"):
            data["init"] = swap.get(data["init"], data["init"])
        return data

    for name in ("base", "sft", "sft_reversal", "sft_sorting", "sft_shift", "student"):  # the demo's block
        assert stages[swap.get(name, name)].model_dump() == renamed(demo[name]), name
    for name in ("teacher_reversal", "teacher_sorting", "teacher_shift"):  # teachers add keep_every only
        assert stages[swap.get(name, name)].model_copy(update={"keep_every": 0}).model_dump() == renamed(demo[name])


def test_rl_teacher_testbed_makes_its_teachers_by_grpo_alone_from_the_shared_start() -> None:
    rl = load_recipe(bundled_recipe("compare_rl_teachers"), check_tokenizers=False)
    ids = stage_identities(rl)
    ids_cmp = stage_identities(load_recipe(bundled_recipe("compare"), check_tokenizers=False))
    assert (ids["base"], ids["sft"]) == (ids_cmp["base"], ids_cmp["sft"])  # the two testbeds share their start
    stages = rl.recipe.stages
    for domain, teacher in rl.recipe.compare.teachers.items():
        assert stages[teacher].kind == "rlvr" and stages[teacher].init == "sft" and stages[teacher].domains == [domain]
    assert stages["student_sampled"].objective == "sampled"
    # the same student but for the estimator and its tuned settings (docs/RESULTS.md: clip 0.5, temperature 1.0 -> 0.6)
    tuned = {"objective": "full_reverse_kl", "temperature": 0.5, "temperature_schedule": "constant",
             "temperature_end": None, "adv_clip": stages["student"].adv_clip}
    assert stages["student_sampled"].model_copy(update=tuned) == stages["student"]
    assert (stages["student_sampled"].adv_clip, stages["student_sampled"].temperature_end) == (0.5, 0.6)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("block", "key", "needle"),
    [
        ("compare: {start: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, methods: {X: ghost}}",
         "compare.methods.X", "'ghost' is not a training stage"),
        ("compare: {start: sft, teachers: {reversal: teacher_rev}, methods: {X: sft}}", "compare.teachers",
         "domain 'sorting' has no teacher"),
        ("compare: {start: nope, teachers: {reversal: teacher_rev, sorting: teacher_sort}, methods: {X: sft}}",
         "compare.start", "'nope' is not a training stage"),
        ("compare: {start: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, methods: {X: sft}, "
         "curves: [Y]}", "compare.curves.0", "'Y' is not a method"),
        ("compare: {start: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, methods: {X: sft}, "
         "curvez: [X]}", "compare.curvez", "unknown key"),
    ],
)
def test_bad_compare_block_fails_in_one_line(tmp_path: Path, block: str, key: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    text = recipe("", block + "\n")
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    line = text.splitlines().index(block) + 1
    assert "\n" not in msg and needle in msg and msg.startswith(f"{path}:{line}: {key}:"), msg


# ---------------------------------------------------------------------------------------------- end to end


MINI = recipe(
    """\
    student: {kind: mopd, init: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, steps: 4,
              batch_size: 2, group_size: 2, eval_every: 2}
    mix: {kind: mix_rl, init: sft, steps: 2, batch_size: 2, group_size: 4, eval_every: 1}
    avg: {kind: merge, base: sft, models: [teacher_rev, teacher_sort]}
    """,
    """\
    compare:
      start: sft
      teachers: {reversal: teacher_rev, sorting: teacher_sort}
      methods: {MOPD: student, Mix-RL: mix, Average merge: avg}
    """,
)


def test_mopd_compare_command_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "mini.yaml"
    path.write_text(MINI)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert list(result["methods"]) == ["MOPD", "Mix-RL", "Average merge"]
    for m in result["methods"].values():
        assert set(m) >= {"normalized_score", "domains", "samples", "wall_seconds"}
        assert set(m["domains"]) == {"reversal", "sorting"}
    assert result["methods"]["MOPD"]["samples"] == 4 * 2 * 2 == result["methods"]["Mix-RL"]["samples"]
    assert result["methods"]["Average merge"]["samples"] == 0
    assert set(result["sample_efficiency"]) == {"MOPD", "Mix-RL"}  # default: the mopd and mix_rl methods
    evals = [json.loads(x) for x in (out / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in evals if "eval/reversal" in r] == [8, 16]  # after step 1, and the final eval
    # a tiny teacher may not beat the start, and then recovery (and so the curve) is undefined
    defined = result["methods"]["Mix-RL"]["normalized_score"] is not None
    assert [p[0] for p in result["sample_efficiency"]["Mix-RL"]] == ([0, 8, 16] if defined else [])
    for f in ("compare.md", "compare_bars.png", "sample_efficiency.png", "report.md"):
        assert (out / f).stat().st_size > 0
    # a second call reuses every finished stage
    again = CliRunner().invoke(app, ["compare", str(path), "--out", str(out)])
    assert again.exit_code == 0, again.output
    run = json.loads((out / "run.json").read_text())
    assert {s["status"] for s in run["stages"].values()} == {"cached"}


def test_compare_needs_a_compare_block(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(recipe(""))
    res = CliRunner().invoke(app, ["compare", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "no `compare:` block" in res.output
    assert not (tmp_path / "out").exists()  # rejected before any compute


def test_compare_leaves_out_a_teacher_that_gained_too_little(tmp_path: Path) -> None:
    """`report.min_teacher_gain` reaches `mopd compare`: b's teacher gains +0.02 (< 0.05), so b is 'teacher gain
    too small' in the table, compare.json and its warning, and the score is a's recovery alone; a plan that sets
    the minimum to 0.01 keeps b."""
    run = tmp_path / "run"
    _stage(run, "sft", {"a": 0.2, "b": 0.5}, [{"step": 1, "samples": 0}])
    _stage(run, "ta", {"a": 0.6, "b": 0.5}, [{"step": 1, "samples": 8}])
    _stage(run, "tb", {"a": 0.2, "b": 0.52}, [{"step": 1, "samples": 8}])
    _stage(run, "mopd", {"a": 0.5, "b": 0.7}, [{"step": 1, "samples": 10}])
    stages = {s: {"kind": "x", "wall_seconds": 1.0} for s in ("sft", "ta", "tb", "mopd")}
    (run / "run.json").write_text(json.dumps({"recipe": "small", "stages": stages,
                                              "report": {"start": "sft", "student": "mopd", "teachers": {}}}))
    plan = {"start": "sft", "teachers": {"a": "ta", "b": "tb"}, "curves": [],
            "methods": {"MOPD": {"stage": "mopd", "kind": "mopd", "chain": ["mopd"], "extra": []}}}
    result = build_compare(run, plan)  # a plan from before the setting: the default 0.05
    m = result["methods"]["MOPD"]
    assert m["domains"]["b"]["recovery"] is None and result["teachers"]["b"]["status"] == "teacher gain too small"
    assert m["normalized_score"] == pytest.approx(0.75)  # (0.5 - 0.2) / (0.6 - 0.2); b's 10.0 left out
    [warning] = result["warnings"]
    assert warning.startswith("b: teacher gain too small: teacher 'tb' gained +0.020")
    md = (run / "compare.md").read_text()
    assert "| 0.750 | teacher gain too small | **0.750** |" in md and f"**Warning**: {warning}." in md
    kept = build_compare(run, {**plan, "min_teacher_gain": 0.01})
    assert kept["warnings"] == [] and kept["methods"]["MOPD"]["domains"]["b"]["recovery"] == pytest.approx(10.0)
