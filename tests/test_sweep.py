"""`mopd sweep` and recipe variants: every bad input is one line before any compute; a 2-point sweep trains the
shared parents once, writes its table and plots, and resumes after losing one point's result (seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mopd.cli import app
from mopd.core.errors import RecipeError
from mopd.experiments.variants import key_path, parse_assignment, parse_grid, parse_value, plan_variants
from mopd.recipe.load import load_recipe

from .mini_compare import recipe

MINI = recipe(
    """\
    student: {kind: mopd, init: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, steps: 2,
              batch_size: 2, group_size: 2}
    """
)


def _write(tmp_path: Path, text: str = MINI) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(text)
    return path


def _invoke(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


# ---------------------------------------------------------------------------------------------- parsing


def test_values_are_read_as_typed() -> None:
    assert [parse_value(t) for t in ("3", "1e-4", "0.5", "true", "sampled", "null")] == [3, 1e-4, 0.5, True,
                                                                                          "sampled", None]
    assert parse_assignment("student.lr=1e-4, 3e-4") == ("student.lr", ["1e-4", "3e-4"])


def test_keys_name_a_stage_setting_or_a_top_level_key() -> None:
    raw = {"stages": {"student": {"kind": "mopd"}}}
    assert key_path(raw, "student.lr") == ("stages", "student", "lr")
    assert key_path(raw, "eval.size") == ("eval", "size")
    for key, needle in [("studnet.lr", "neither a stage (student) nor a top-level"), ("student", "names a stage"),
                        ("seed", "use --seeds"), ("student..lr", "empty part")]:
        with pytest.raises(RecipeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            key_path(raw, key)
    with pytest.raises(RecipeError, match="set twice"):
        parse_grid(["student.lr=1", "student.lr=2"])


def test_variants_keep_identities_of_what_they_do_not_change(tmp_path: Path) -> None:
    from mopd.recipe.identity import stage_identities

    loaded = load_recipe(_write(tmp_path))
    variants = plan_variants(loaded, tmp_path / "out", 2, [("student.lr", ["1e-3", "2e-3"])])
    assert [(v.name, v.seed) for v in variants] == [("student.lr=1e-3", 0), ("student.lr=1e-3", 1),
                                                    ("student.lr=2e-3", 0), ("student.lr=2e-3", 1)]
    assert variants[2].out == tmp_path / "out" / "student.lr=2e-3" / "seed-0"
    ids = [stage_identities(v.loaded) for v in variants]
    assert ids[0]["sft"] == ids[2]["sft"] != ids[1]["sft"]  # same seed: parents shared across points
    assert ids[0]["student"] != ids[2]["student"]
    assert variants[0].loaded.recipe.stages["student"].lr == 1e-3
    assert stage_identities(loaded) == ids[0] | {"student": stage_identities(loaded)["student"]}
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_log_reaches_every_seed_and_sweep_variant(tmp_path: Path) -> None:
    """Issue 38: `--log` (the command's trackers over the file's `logging:`) reaches each variant, which used to
    get the file's `logging:` alone; the copy of the recipe in each variant's directory says so too."""
    import yaml

    from mopd.tracking import with_trackers

    loaded = load_recipe(_write(tmp_path))
    assert loaded.recipe.logging.tensorboard is False
    loaded.recipe.logging = with_trackers(loaded.recipe.logging, ["tensorboard"])  # what `_with_log` does
    variants = plan_variants(loaded, tmp_path / "out", 2, [("student.lr", ["1e-3", "2e-3"])])
    assert all(v.loaded.recipe.logging.tensorboard for v in variants) and len(variants) == 4
    assert all(yaml.safe_load(yaml.safe_dump(v.raw))["logging"] == {"tensorboard": True} for v in variants)
    plain = plan_variants(load_recipe(_write(tmp_path)), tmp_path / "out", 2)
    assert not any(v.loaded.recipe.logging.tensorboard for v in plain) and "logging" not in plain[0].raw


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "student.lrr=1e-3"], "--set student.lrr=1e-3: stages.student.lrr: unknown key"),
        (["--set", "studnet.lr=1e-3"], "'studnet' is neither a stage"),
        (["--set", "student.lr=abc"], "--set student.lr=abc: stages.student.lr: Input should be a valid number"),
        (["--set", "student.lr=1e-3,-1"], "--set student.lr=-1: stages.student.lr: Input should be greater than 0"),
        (["--set", "student.lr="], "empty value"),
        (["--set", "student.lr=1e-3,"], "empty value"),
        (["--set", "student.lr"], "expected KEY=VALUE"),
        (["--set", "student.lr=1e-3", "--seeds", "0"], "--seeds 0: must be from 1 to 1000"),
        (["--set", "student.lr=1e-3", "--seeds", "5000"], "--seeds 5000: must be from 1 to 1000"),
        ([], "give at least one --set"),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_compute(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    line = _one_error_line(_invoke("sweep", _write(tmp_path), *args, "--out", out))
    assert needle in line, line
    assert not out.exists()


def test_compare_refuses_zero_seeds_in_one_line(tmp_path: Path) -> None:
    text = MINI + "compare: {start: sft, teachers: {reversal: teacher_rev, sorting: teacher_sort}, " \
                  "methods: {MOPD: student}}\n"
    out = tmp_path / "out"
    assert "--seeds 0: must be from 1 to 1000" in _one_error_line(
        _invoke("compare", _write(tmp_path, text), "--seeds", "0", "--out", out))
    assert not out.exists()
    bad = _write(tmp_path, text.replace("seed: 0\n", "seed: 0\nseeds: 0\n", 1))
    assert "seeds: Input should be greater than or equal to 1" in _one_error_line(_invoke("compare", bad))


# ---------------------------------------------------------------------------------------------- end to end


def _statuses(run_dir: Path) -> dict[str, str]:
    return {n: s["status"] for n, s in json.loads((run_dir / "run.json").read_text())["stages"].items()}


def test_two_point_sweep_shares_parents_and_resumes(tmp_path: Path) -> None:
    path, out = _write(tmp_path), tmp_path / "sweep"
    res = _invoke("sweep", path, "--set", "student.lr=1e-3,2e-3", "--out", out)
    assert res.exit_code == 0, res.output
    first, second = out / "student.lr=1e-3", out / "student.lr=2e-3"
    assert set(_statuses(first).values()) == {"ran"}
    shared = {"base", "sft", "teacher_rev", "teacher_sort"}
    assert _statuses(second) == {**dict.fromkeys(shared, "cached"), "student": "ran"}  # parents trained once
    assert all((second / s).is_symlink() for s in shared) and not (second / "student").is_symlink()
    result = json.loads((out / "sweep.json").read_text())
    assert [p["settings"] for p in result["points"]] == [{"student.lr": "1e-3"}, {"student.lr": "2e-3"}]
    assert [p["seed_dirs"] for p in result["points"]] == [["student.lr=1e-3"], ["student.lr=2e-3"]]
    assert result["points"][0]["objective"] == "sampled"
    md = (out / "sweep.md").read_text()
    assert "## student.lr" in md and "| `1e-3` |" in md and "## Best setting per objective" in md
    assert (out / "sweep_student.lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shutil.rmtree(first / "student" / "final")  # one point's result lost (or the point interrupted)
    again = _invoke("sweep", path, "--set", "student.lr=1e-3,2e-3", "--out", out)
    assert again.exit_code == 0, again.output
    assert _statuses(first) == {**dict.fromkeys(shared, "cached"), "student": "ran"}
    assert set(_statuses(second).values()) == {"cached"}  # the finished point is skipped

    more = _invoke("sweep", path, "--set", "student.lr=3e-3", "--out", out)  # a new value, into the same directory
    assert more.exit_code == 0, more.output
    assert _statuses(out / "student.lr=3e-3") == {**dict.fromkeys(shared, "cached"), "student": "ran"}
    # sweep.md covers this invocation's one point; sweep_all.md every point of the three invocations, best first
    assert [p["name"] for p in json.loads((out / "sweep.json").read_text())["points"]] == ["student.lr=3e-3"]
    history = json.loads((out / "sweep_all.json").read_text())
    names = [p["name"] for p in history["points"]]
    assert sorted(names) == ["student.lr=1e-3", "student.lr=2e-3", "student.lr=3e-3"]
    scores = [p["normalized_score"] for p in history["points"]]  # best first; undefined (no teacher gain) last
    defined = [s for s in scores if s is not None]
    assert scores == sorted(defined, reverse=True) + [None] * (len(scores) - len(defined))
    assert all(p["settings"] == {"student.lr": p["name"].split("=")[1]} for p in history["points"])
    assert history["best"].get("sampled", {}).get("point") == (names[0] if defined else None)
    assert "# Every sweep point" in (out / "sweep_all.md").read_text()
    for p in history["points"]:  # each seed's domains: start, teacher, student and the recovery they make
        [seed] = p["per_seed_domains"]
        assert set(seed) == {"reversal", "sorting"}
        for v in seed.values():
            gain = v["teacher"] - v["start"]
            assert v["recovery"] == (pytest.approx((v["student"] - v["start"]) / gain) if gain > 1e-9 else None)


def test_links_follow_identities_and_a_stale_link_is_replaced(tmp_path: Path) -> None:
    from mopd.experiments.variants import finished_stages, link_shared_stages
    from mopd.recipe.identity import stage_identities

    loaded = load_recipe(_write(tmp_path))
    a, b = plan_variants(loaded, tmp_path / "out", 1, [("student.lr", ["1e-3", "2e-3"])])
    ids = stage_identities(a.loaded)
    for name in ("sft", "student"):  # a finished `sft` and `student` in point a (only their lineage matters here)
        (a.out / name / "final").mkdir(parents=True)
        (a.out / name / "final" / "mopd.json").write_text(json.dumps({"identity": ids[name]}))
    b.out.mkdir(parents=True)
    assert link_shared_stages(b, finished_stages([a.out, b.out])) == ["sft"]  # b's student differs: not linked
    assert (b.out / "sft").resolve() == (a.out / "sft").resolve() and not (b.out / "student").exists()
    assert link_shared_stages(b, finished_stages([a.out, b.out])) == []  # already linked
    (a.out / "sft" / "final" / "mopd.json").write_text(json.dumps({"identity": "0" * 16}))  # a's sft changed
    (tmp_path / "elsewhere" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "elsewhere" / "sft" / "final" / "mopd.json").write_text(json.dumps({"identity": ids["sft"]}))
    assert link_shared_stages(b, finished_stages([a.out, tmp_path / "elsewhere"])) == ["sft"]
    assert (b.out / "sft").resolve() == (tmp_path / "elsewhere" / "sft").resolve()


def test_a_point_that_fails_is_a_hole_in_the_table_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """The first point's student is refused by an impossible teacher gate; the second point still runs, the table
    is written, and the command ends with exit 2 and one line naming the point and the stage."""
    path, out = _write(tmp_path), tmp_path / "sweep"
    res = _invoke("sweep", path, "--set", "student.preflight={min_teacher_gain: 0.99},{kl_warn: 5.0}",
                  "--out", out)
    assert res.exit_code == 2, res.output
    errors = res.output[res.output.index("error:"):].replace("\n", " ")
    [gated] = [p for p in out.iterdir() if "min_teacher_gain" in p.name]
    [other] = [p for p in out.iterdir() if "kl_warn" in p.name]
    assert f"error: {gated.name}: stage 'student': teachers must beat the start" in errors
    assert not (gated / "student" / "final").exists() and (other / "student" / "final").is_dir()
    assert (out / "sweep.md").is_file() and len(json.loads((out / "sweep.json").read_text())["points"]) == 2


def test_every_point_a_directory_holds_is_found_and_nothing_else(tmp_path: Path) -> None:
    """`sweep_points` reads the layout, not a ledger: point directories (one seed, or seed-<s> in seed order),
    never links, seed-only directories of `compare --seeds`, or a point that has no run yet."""
    from mopd.experiments.sweep import _objective_in
    from mopd.experiments.variants import point_settings, sweep_points

    for d in ("a.lr=1e-3", "a.lr=2e-3/seed-10", "a.lr=2e-3/seed-2", "seed-0", "a.lr=5e-3"):
        (tmp_path / d).mkdir(parents=True)
    for d in ("a.lr=1e-3", "a.lr=2e-3/seed-10", "a.lr=2e-3/seed-2", "seed-0"):
        (tmp_path / d / "run.json").write_text("{}")
    (tmp_path / "a.lr=9e-3").symlink_to(tmp_path / "a.lr=1e-3")
    found = sweep_points(tmp_path)
    assert list(found) == ["a.lr=1e-3", "a.lr=2e-3"]
    assert [p.name for p in found["a.lr=2e-3"]] == ["seed-2", "seed-10"]
    assert point_settings("student.lr=1e-3__student.preflight=-kl_warn-5.0-") == {
        "student.lr": "1e-3", "student.preflight": "-kl_warn-5.0-"}
    (tmp_path / "a.lr=1e-3" / "recipe.yaml").write_text("stages: [not, a, mapping")  # untrusted: not YAML
    assert _objective_in(tmp_path / "a.lr=1e-3", "student") is None
    (tmp_path / "a.lr=1e-3" / "recipe.yaml").write_text("stages: {student: {objective: jsd}}")
    assert _objective_in(tmp_path / "a.lr=1e-3", "student") == "jsd"
