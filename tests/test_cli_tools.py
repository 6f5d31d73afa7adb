"""The daily-loop commands: validate, schema, recipes, init (its starter runs), eval; --help with examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mopd.cli import app
from mopd.cli_tools.bundled import SCHEMA_COMMENT, bundled_recipes, recipes_dir, shipped_schema_path
from mopd.cli_tools.scaffold import PLUGIN_DOMAIN
from mopd.core.schema import EvalSettings, TinyModelConfig
from mopd.envs import ALPHABET, get_domain
from mopd.eval.evaluate import evaluate
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer

COMMANDS = ["run", "demo", "compare", "sweep", "report", "validate", "schema", "recipes", "init", "eval", "serve"]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    res = invoke(command, "--help")
    assert res.exit_code == 0, res.output
    assert "Examples:" in res.output and f"mopd {command}" in res.output.split("Examples:")[1]


def test_shell_completion_is_offered():
    assert "--install-completion" in invoke("--help").output


def test_validate_a_good_recipe_in_one_line_and_a_bad_one_exits_2(tmp_path):
    res = invoke("validate", recipes_dir() / "demo.yaml")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ok: ") and "9 stages (pretrain 1, sft 4, rlvr 3, mopd 1)" in res.output
    by_name = invoke("validate", "demo")  # a bundled recipe by name, as `mopd run demo` takes it
    assert by_name.exit_code == 0 and by_name.output.split(":", 2)[2] == res.output.split(":", 2)[2]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndomains: [addition]\nstages:\n  base: {kind: pretrain, steps: 2, lr_typo: 1}\n")
    line = one_error_line(invoke("validate", bad))
    assert "bad.yaml:4" in line and "lr_typo" in line
    assert not (tmp_path / "runs").exists()


def test_the_shipped_schema_is_what_mopd_schema_prints():
    res = invoke("schema")
    assert res.exit_code == 0
    assert res.output == shipped_schema_path().read_text()
    schema = json.loads(res.output)
    assert schema["title"] == "Recipe" and "stages" in schema["properties"]


def test_bundled_recipes_name_the_schema_and_validate_against_it():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(shipped_schema_path().read_text())
    validator = jsonschema.Draft202012Validator(schema)
    recipes = sorted(recipes_dir().glob("*.yaml"))
    assert recipes
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first == SCHEMA_COMMENT, path
        assert (path.parent / first.split("$schema=")[1]).resolve() == shipped_schema_path().resolve()
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path
        data["stages"][next(iter(data["stages"]))]["lr_typo"] = 1.0  # the schema does check: a typo is caught
        assert list(validator.iter_errors(data)), path


def test_recipes_lists_each_bundled_recipe_with_its_description():
    res = invoke("recipes")
    assert res.exit_code == 0
    listed = {line.split()[0]: line for line in res.output.splitlines()}
    assert set(listed) == set(bundled_recipes()) >= {"demo", "compare", "qwen3_0.6b"}
    assert "The demo recipe: the whole 2026 post-training pipeline" in listed["demo"]
    assert "yaml-language-server" not in res.output
    paths = invoke("recipes", "--paths").output.split()
    assert all(Path(p).is_file() for p in paths) and len(paths) == len(listed)


@pytest.fixture(scope="module")
def starter(tmp_path_factory) -> Path:
    """One `mopd init` directory with the plugin's domain (a plugin file registers its domain once per process)."""
    d = tmp_path_factory.mktemp("starter")
    res = invoke("init", d, "--domains", f"reversal,{PLUGIN_DOMAIN}")
    assert res.exit_code == 0, res.output
    return d


def test_init_writes_a_recipe_that_validates(starter):
    assert sorted(p.name for p in starter.iterdir()) == ["my_domains.py", "recipe.schema.json", "recipe.yaml"]
    text = (starter / "recipe.yaml").read_text()
    assert text.splitlines()[0] == SCHEMA_COMMENT and (starter / "recipe.schema.json").read_text() == \
        shipped_schema_path().read_text()
    res = invoke("validate", starter / "recipe.yaml")
    assert res.exit_code == 0, res.output
    assert "domains reversal, vowel_count" in res.output and "teacher_vowel_count" in res.output


def test_init_refuses_to_overwrite_unknown_domains_and_teachers_that_are_not_checkpoints(starter, tmp_path):
    assert "exists; pass --force" in one_error_line(invoke("init", starter))
    assert "unknown domain 'nope'" in one_error_line(invoke("init", tmp_path / "a", "--domains", "reversal,nope"))
    line = one_error_line(invoke("init", tmp_path / "b", "--teachers", f"reversal={tmp_path}"))
    assert "not a Hugging Face checkpoint directory" in line
    assert "is not one of --domains" in one_error_line(invoke("init", tmp_path / "c", "--teachers", "shift=x"))
    assert not (tmp_path / "a").exists()


def test_init_with_an_existing_teacher_distils_from_that_directory(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_checkpoint(teacher)
    res = invoke("init", tmp_path / "p", "--domains", "reversal,sorting", "--teachers", f"sorting={teacher}")
    assert res.exit_code == 0, res.output
    student = yaml.safe_load((tmp_path / "p" / "recipe.yaml").read_text())["stages"]["student"]
    assert student["teachers"] == {"reversal": "teacher_reversal", "sorting": str(teacher.resolve())}
    assert "teacher_sorting" not in yaml.safe_load((tmp_path / "p" / "recipe.yaml").read_text())["stages"]


def test_the_starter_runs_end_to_end_at_a_reduced_scale(starter, tmp_path):
    recipe = yaml.safe_load((starter / "recipe.yaml").read_text())
    recipe["eval"] = {"size": 8, "max_new_tokens": 6}
    recipe["stages"]["base"]["model"] = {"hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1,
                                         "intermediate_size": 64}
    for stage in recipe["stages"].values():
        stage.update(steps=2, batch_size=8)
        stage.pop("warmup_steps", None)
        if stage["kind"] == "mopd":
            stage["eval_every"] = 1
    small = starter / "small.yaml"  # beside the starter: its plugin path is relative to the recipe
    small.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    res = invoke("run", small, "--out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "normalized score:" in res.output
    lineage = json.loads((out / "student" / "final" / "mopd.json").read_text())
    assert set(lineage["metrics"]["eval"]) == {"reversal", PLUGIN_DOMAIN}


def tiny_checkpoint(path: Path) -> Path:
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32),
                             len(tok), tok, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_eval_scores_a_checkpoint_as_the_held_out_evaluation_does(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "scores" / "s.json"
    res = invoke("eval", ckpt, "--domains", "addition,reversal", "--size", "6", "--max-new-tokens", "4",
                 "--out", out)
    assert res.exit_code == 0, res.output
    assert "addition" in res.output and "reversal" in res.output and "mean" in res.output
    data = json.loads(out.read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = EvalSettings(size=6, max_new_tokens=4)
    tok = AutoTokenizer.from_pretrained(ckpt)
    direct = evaluate(AutoModelForCausalLM.from_pretrained(ckpt).eval(), tok,
                      [get_domain("addition"), get_domain("reversal")], settings)
    assert data["domains"] == direct
    assert data["eval"]["size"] == 6 and data["model"] == str(ckpt.resolve())
    assert data["mean_score"] == pytest.approx((direct["addition"]["score"] + direct["reversal"]["score"]) / 2)


def test_eval_refuses_a_bad_directory_and_an_unknown_domain_in_one_line(tmp_path):
    assert "not a directory" in one_error_line(invoke("eval", tmp_path / "missing", "--domains", "addition"))
    assert "no config.json" in one_error_line(invoke("eval", tmp_path, "--domains", "addition"))
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    line = one_error_line(invoke("eval", ckpt, "--domains", "addition,nope"))
    assert "unknown domain 'nope'" in line and "reversal" in line
    assert one_error_line(invoke("eval", ckpt, "--domains", "addition", "--size", "0")) == \
        "error: --size: Input should be greater than 0"
