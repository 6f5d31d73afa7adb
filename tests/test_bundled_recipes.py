"""The bundled report recipes (one per post-training report) and the reduced-scale knob (`scale:`, `--scale`).

Every report recipe validates, says which report it follows and what it simplifies, is listed by `mopd
recipes`, and runs end to end at scale 0.01 (all of them in one run that trains their shared start once, as
benchmarks/recipes_table.py does at full scale; test_recipe_expected.py checks the same run's numbers against
the stored ones). The knob: what shrinks and by how much, its one-line errors, and that a scaled stage's identity
never equals the full recipe's.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mopd.cli import app
from mopd.cli_tools.bundled import (
    REPORT_RECIPES,
    bundled_recipe,
    bundled_recipes,
    recipe_summary,
)
from mopd.core.schema import EvalStage
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe
from mopd.recipe.reduced_scale import MIN_BATCH, MIN_EVAL, MIN_STEPS, shrink
from mopd.report.run_files import read_final_eval

from .recipe_expected import group_runs

SCALE = 0.01


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def _scaled(tmp_path: Path, name: str, scale: object, edit=None) -> Path:
    raw = yaml.safe_load(bundled_recipe(name).read_text())
    raw["scale"] = scale
    if edit:
        edit(raw)
    path = tmp_path / f"{name}-{scale}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Every report recipe at SCALE, run in order into one folder (the shared start trained once), on one torch
    thread: dozens of tiny stages, each too small for two threads to pay off. Run once per session by
    tests/recipe_expected.py, whose stored numbers (test_recipe_expected.py) are checked on the same run."""
    return group_runs("report", tmp_path_factory)


@pytest.mark.parametrize("name", REPORT_RECIPES)
def test_each_report_recipe_validates_and_says_what_it_follows_and_simplifies(name: str) -> None:
    path = bundled_recipe(name)
    loaded = load_recipe(path)
    assert loaded.recipe.name == name and loaded.recipe.scale == 1
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert "arXiv 2" in header or "no arXiv id" in header, name
    assert "Simplifications:" in header, name
    res = invoke("validate", path)
    assert res.exit_code == 0 and res.output.startswith("ok: "), res.output


# the reports whose open-ended prompts are rewarded by preference or a judge: their recipes reward `style` (the
# domain with no rule-based answer) by the shared judge somewhere in their stages
JUDGED = {"instructgpt", "llama2", "llama3", "tulu3", "r1", "deepseek_v32", "glm5", "nemotron3_ultra"}


def _judged_stages(loaded) -> list[str]:
    """Stages that rank or reward `style` by a judge (directly, or through a reward model trained on its ranking)."""
    out = []
    for name, stage in loaded.recipe.stages.items():
        reward = getattr(stage, "reward", None)
        per_domain = getattr(reward, "per_domain", {}) or {}
        source = per_domain.get("style")
        if getattr(source, "judge", None) == "judge":
            out.append(name)
    return out


def test_report_recipes_share_one_start_so_their_scores_compare() -> None:
    """One four-domain start (base, sft and the style judge) for every report recipe, and one set of teachers."""
    loaded = {name: load_recipe(bundled_recipe(name), check_tokenizers=False) for name in REPORT_RECIPES}
    ids = {name: stage_identities(one) for name, one in loaded.items()}
    assert len({i["base"] for i in ids.values()}) == 1 and len({i["sft"] for i in ids.values()}) == 1
    assert len({i["judge"] for i in ids.values() if "judge" in i}) == 1
    assert all(one.recipe.domains == ["reversal", "sorting", "caesar", "style"] for one in loaded.values())
    with_teachers = [i for i in ids.values() if "teacher_reversal" in i]
    assert len(with_teachers) >= 2 and len({i["teacher_reversal"] for i in with_teachers}) == 1
    for name, one in loaded.items():
        assert bool(_judged_stages(one)) == (name in JUDGED), name


def test_mopd_recipes_lists_each_report_recipe_on_one_line() -> None:
    res = invoke("recipes")
    assert res.exit_code == 0
    listed = {line.split()[0]: line for line in res.output.splitlines()}
    for name in REPORT_RECIPES:
        summary = recipe_summary(bundled_recipe(name))
        assert summary and summary == bundled_recipes()[name]
        assert listed[name].split(None, 1)[1].startswith(summary[:60]), listed[name]


@pytest.mark.parametrize("name", REPORT_RECIPES)
def test_each_report_recipe_runs_end_to_end_at_a_reduced_scale(runs: dict[str, Path], name: str) -> None:
    out = runs[name]
    loaded = load_recipe(out / "recipe.yaml")
    assert loaded.recipe.scale == SCALE
    ids = stage_identities(loaded)
    run = json.loads((out / "run.json").read_text())
    evals = [n for n, s in loaded.recipe.stages.items() if isinstance(s, EvalStage)]
    assert evals, "each report recipe ends in an eval stage that scores its models side by side"
    for stage in loaded.order:
        assert run["stages"][stage]["identity"] == ids[stage], stage
        if stage not in evals:
            lineage = json.loads((out / stage / "final" / "mopd.json").read_text())
            assert lineage["identity"] == ids[stage]
            if loaded.recipe.stages[stage].kind != "reward_model":  # scored on its held-out pairs instead
                assert set(lineage["metrics"]["eval"]) == set(loaded.recipe.domains), stage
    for stage in evals:
        scores = json.loads((out / stage / "final" / "eval.json").read_text())
        assert set(scores) == set(loaded.recipe.stages[stage].models)
        for model in scores.values():
            assert all(len(d["rewards"]) == loaded.recipe.eval.size for d in model.values())


def test_the_shared_start_is_trained_once_across_recipes(runs: dict[str, Path]) -> None:
    first, *rest = runs.values()
    assert not (first / "base").is_symlink()
    for out in rest:
        for stage in ("base", "sft"):
            assert (out / stage).is_symlink() and (out / stage).resolve() == (first / stage).resolve(), out


def test_scale_shrinks_steps_batches_and_eval_with_floors(tmp_path: Path) -> None:
    full = load_recipe(bundled_recipe("tulu3")).recipe
    small = load_recipe(_scaled(tmp_path, "tulu3", 0.05)).recipe
    assert (small.stages["base"].steps, small.stages["base"].batch_size) == (25, 4)  # 500 * 0.05; 64 * 0.05 -> 4
    assert small.stages["base"].warmup_steps == 1 and small.stages["base"].checkpoint_every == 5  # 20, 100 x 25/500
    assert (small.stages["sft"].steps, small.stages["dpo"].steps, small.stages["rlvr"].steps) == (5, 3, 3)
    assert small.stages["dpo"].checkpoint_every == 1  # 20 x 3/60
    assert small.eval.size == 10 and full.eval.size == 200
    for key in ("lr", "group_size", "beta", "max_new_tokens", "length_normalized"):  # method settings stay
        assert getattr(small.stages["dpo"], key) == getattr(full.stages["dpo"], key)
    assert small.stages["base"].model == full.stages["base"].model
    assert (shrink(3, 0.01, MIN_STEPS), shrink(1, 0.01, MIN_STEPS), shrink(600, 0.01, MIN_STEPS)) == (2, 1, 6)
    assert (shrink(64, 0.01, MIN_BATCH), shrink(2, 0.01, MIN_BATCH), shrink(300, 0.01, MIN_EVAL)) == (4, 2, 8)


def test_scale_keeps_teacher_schedules_and_cascade_phases_consistent(tmp_path: Path) -> None:
    """compare.yaml's staged teachers (snapshot 25 of 50 steps, kept every 25) and a cascade with its own steps
    per domain pass every load check at scale 0.05: the snapshot becomes the teachers' first kept step."""
    def cascade_steps(raw):
        raw["stages"]["cascade_rl"]["steps_per_domain"] = {"reversal": 300, "sorting": 100, "caesar": 100}

    small = load_recipe(_scaled(tmp_path, "compare", 0.05, cascade_steps)).recipe
    staged, teacher = small.stages["student_staged"], small.stages["teacher_reversal"]
    assert (teacher.steps, teacher.keep_every) == (2, 1)
    assert [(p.until_step, p.snapshot) for p in staged.teacher_schedule] == [(25, 1), (50, "final")]
    assert staged.steps == 50
    cascade = small.stages["cascade_rl"]
    assert cascade.steps_per_domain == {"reversal": 15, "sorting": 5, "caesar": 5} and cascade.steps == 25


def test_scale_keeps_ppo_checkpoints_on_whole_epochs_and_shrinks_held_out_pairs(tmp_path: Path) -> None:
    def two_epochs(raw):
        raw["stages"]["ppo"].update(epochs=2, checkpoint_every=50)

    small = load_recipe(_scaled(tmp_path, "instructgpt", 0.1, two_epochs)).recipe
    assert (small.stages["ppo"].steps, small.stages["ppo"].checkpoint_every) == (10, 6)  # 50 x 10/100 = 5 -> 6
    assert small.stages["rm"].eval_pairs == 8  # 32 x 0.1 -> the floor


def test_a_scaled_stage_never_shares_an_identity_with_the_full_recipe(tmp_path: Path) -> None:
    full = stage_identities(load_recipe(bundled_recipe("r1"), check_tokenizers=False))
    one = stage_identities(load_recipe(_scaled(tmp_path, "r1", 1), check_tokenizers=False))
    assert one == full  # `scale: 1` is the full recipe: existing identities do not move
    small = stage_identities(load_recipe(_scaled(tmp_path, "r1", 0.5), check_tokenizers=False))
    assert not set(small.values()) & set(full.values())


@pytest.mark.parametrize("scale", [0, -0.5, 1.5, "small"])
def test_a_bad_scale_is_one_line_at_load(tmp_path: Path, scale: object) -> None:
    with pytest.raises(RecipeError) as e:
        load_recipe(_scaled(tmp_path, "r1_zero", scale))
    msg = str(e.value)
    assert "\n" not in msg and ": scale: " in msg


def test_mopd_run_scale_writes_its_own_run_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = invoke("run", "r1_zero", "--scale", "0")
    assert res.exit_code == 2 and res.output.strip().startswith("error: --scale 0: scale: "), res.output
    assert not (tmp_path / "runs").exists()
    res = invoke("run", "r1_zero", "--scale", SCALE, "--threads", 1)
    assert res.exit_code == 0, res.output
    out = tmp_path / "runs" / f"r1_zero-scale{SCALE:g}"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["scale"] == SCALE
    assert json.loads((out / "zero" / "final" / "mopd.json").read_text())["identity"] == \
        stage_identities(load_recipe(out / "recipe.yaml"))["zero"]


def test_recipes_table_reads_every_run_against_one_start_and_the_shared_teachers(runs, tmp_path, monkeypatch):
    """benchmarks/recipes_table.py's reading of the runs: each result's recovery is (result - sft) / (teacher -
    sft) with the one shared sft and teachers, and the table lands between its markers, the rest of the doc kept."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    table = importlib.import_module("recipes_table")
    root = runs["mimo_v2_flash"].parent
    domains = ["reversal", "sorting", "caesar"]
    teachers = table.shared_teachers(root, domains)
    assert set(teachers) == set(domains) and teachers["caesar"]["stage"] == "deepseek_v32/teacher_caesar"
    shared = table.start_identity("tulu3", SCALE)
    assert table.start_identity("olmo3", SCALE) == shared == table.start_identity("glm5", SCALE)
    result = table.summarize("olmo3", runs["olmo3"], teachers, own_start=False)
    assert result["result"] == "rlvr" and set(result["models"]) == {"sft", "strong", "dpo", "rlvr"}
    start = read_final_eval(runs["olmo3"] / "sft")
    for d in domains:
        gain = teachers[d]["score"] - start[d]["score"]
        want = (result["models"]["rlvr"][d]["score"] - start[d]["score"]) / gain if gain > 1e-9 else None
        assert result["recovery"][d] == pytest.approx(want) if want is not None else result["recovery"][d] is None
        assert result["samples"][d]["prompt"].endswith("=")
    # `style` is scored but has no teacher: it is left out of the normalized score, not counted as missing
    assert result["recovery"]["style"] is None and "style" in result["models"]["rlvr"]
    defined = [r for d, r in result["recovery"].items() if r is not None]
    assert result["normalized_score"] == (pytest.approx(sum(defined) / len(defined)) if defined else None)
    doc = tmp_path / "RECIPES.md"
    doc.write_text(f"# head\n{table.TABLE_BEGIN}\nold table\n{table.TABLE_END}\n## tail\n")
    meta = {"domains": [*domains, "style"], "cpu": "cpu", "cores": 2, "threads": 1, "scale": SCALE}
    glm5 = table.summarize("glm5", runs["glm5"], teachers, own_start=True)  # as a recipe on another start reads
    assert glm5["normalized_score"] is None and "style" in glm5["models"]["general"]
    table.write_doc(doc, table.markdown({"olmo3": result, "glm5": glm5}, teachers, meta))
    text = doc.read_text()
    assert text.startswith("# head\n") and text.endswith("## tail\n") and "old table" not in text
    assert "| olmo3 | rlvr |" in text and "| glm5 (own start) | general |" in text
    olmo3_row = next(line for line in text.splitlines() if line.startswith("| olmo3 |"))
    assert olmo3_row.split(" | ")[5].split(" (")[0] == f"{result['models']['rlvr']['style']['score']:.3f}"
    # an earlier measurement in recipes.json is kept for a recipe this run did not measure, and only then
    saved = tmp_path / "recipes.json"
    saved.write_text(json.dumps({"meta": {**meta, "scale": SCALE}, "teachers": teachers,
                                 "recipes": {"olmo3": result, "glm5": glm5}}))
    kept = table.earlier_entries(saved, SCALE, {"glm5"})
    assert set(kept["recipes"]) == {"olmo3"} and table.earlier_entries(saved, 1.0, set()) is None
