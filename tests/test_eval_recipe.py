"""`mopd eval --recipe` and `--domains bundled:NAME`: a checkpoint scored on a recipe's domains (registered, plugin,
data-backed) with each domain's own generation length, which every stage's held-out eval uses too."""

from __future__ import annotations

import json
import string
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from mopd.cli_tools.bundled import bundled_recipe
from mopd.cli_tools.score import BUNDLED_DATA, BUNDLED_MAX_NEW_TOKENS, plan_eval
from mopd.core.schema import TinyModelConfig
from mopd.envs import register_domain
from mopd.eval import evaluate as evaluate_module
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import save_checkpoint
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe

from .test_cli_tools import invoke, one_error_line

torch.set_num_threads(1)

PLUGIN = textwrap.dedent(
    """\
    from mopd.envs import register_domain


    @register_domain("evalrecipe_echo", difficulties=(1,), max_new_tokens=2)
    def echo(rng, difficulty):
        word = "".join(rng.choice("abcdef") for _ in range(3))
        return f"echo {word}:", word
    """
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny character model whose tokenizer covers the bundled data (string.printable)."""
    tok = build_char_tokenizer(string.printable)
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=32),
                             len(tok), tok, seed=0)
    path = tmp_path_factory.mktemp("eval_recipe") / "ckpt"
    save_checkpoint(path, model, tok, {"stage": "external"})
    (path.parent / "echo_plugin.py").write_text(PLUGIN)  # one file: a plugin registers its domain once a session
    return path


def write_recipe(directory: Path, ckpt: Path, math_tokens: int | None = 5) -> Path:
    """A recipe with a built-in domain (eval.max_new_tokens), a plugin domain (its own 2) and bundled math data
    (`math_tokens`), whose one stage scores `ckpt`."""
    directory.mkdir(parents=True, exist_ok=True)
    math = {"name": "math", "source": "bundled:math", "verifier": "math"}
    if math_tokens is not None:
        math["max_new_tokens"] = math_tokens
    recipe = {
        "name": "evalrecipe", "plugins": [str(ckpt.parent / "echo_plugin.py")], "tokenizer": {"alphabet": "printable"},
        "domains": ["addition", "evalrecipe_echo", math],
        "eval": {"size": 4, "max_new_tokens": 3, "batch_size": 8},
        "stages": {"score": {"kind": "eval", "models": [str(ckpt)]}},
    }
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def lengths(monkeypatch) -> list[int]:
    """The max_new_tokens of every sampler call of the held-out evaluation, in order (each call then decodes at
    most 8 tokens, which keeps a 384-token domain fast on the tiny model)."""
    seen: list[int] = []
    real = evaluate_module.sample

    def spy(*args, **kwargs):
        seen.append(kwargs["max_new_tokens"])
        return real(*args, **{**kwargs, "max_new_tokens": min(kwargs["max_new_tokens"], 8)})

    monkeypatch.setattr(evaluate_module, "sample", spy)
    return seen


def test_eval_with_a_recipe_scores_every_domain_at_its_own_length(ckpt, tmp_path, lengths):
    recipe = write_recipe(tmp_path / "r", ckpt)
    out = tmp_path / "scores.json"
    res = invoke("eval", ckpt, "--recipe", recipe, "--out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert lengths == [3, 2, 5]  # addition: eval.max_new_tokens; the plugin's own 2; the data domain's own 5
    data = json.loads(out.read_text())
    assert set(data["domains"]) == {"addition", "evalrecipe_echo", "math"}
    assert data["eval"] == {"size": 4, "seed": 1234, "max_new_tokens": 3, "batch_size": 8}
    assert data["max_new_tokens"] == {"addition": 3, "evalrecipe_echo": 2, "math": 5}
    assert all(len(v["rewards"]) == 4 for v in data["domains"].values())
    assert "math" in res.output and "max new tokens" in res.output


def test_the_command_line_overrides_the_recipe_and_picks_its_domains(ckpt, tmp_path, lengths):
    recipe = write_recipe(tmp_path / "r", ckpt)
    out = tmp_path / "scores.json"
    res = invoke("eval", ckpt, "--recipe", recipe, "--domains", "math,addition", "--size", "2",
                 "--max-new-tokens", "4", "--out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    assert lengths == [4, 4]  # an explicit --max-new-tokens is every domain's, the data domain's own included
    data = json.loads(out.read_text())
    assert set(data["domains"]) == {"math", "addition"} and data["eval"]["size"] == 2
    assert all(len(v["rewards"]) == 2 for v in data["domains"].values())


def test_a_stage_eval_uses_each_domains_own_length(ckpt, tmp_path, lengths):
    run_recipe(load_recipe(write_recipe(tmp_path / "r", ckpt)), tmp_path / "run")
    assert lengths == [3, 2, 5]
    scores = json.loads((tmp_path / "run" / "score" / "final" / "eval.json").read_text())
    assert set(next(iter(scores.values()))) == {"addition", "evalrecipe_echo", "math"}


def test_a_domains_length_enters_the_identity_only_when_declared(ckpt, tmp_path):
    unset = stage_identities(load_recipe(write_recipe(tmp_path / "a", ckpt, None)))
    five = stage_identities(load_recipe(write_recipe(tmp_path / "b", ckpt, 5)))
    assert unset != five  # what a stage's eval scores changed, as with eval.max_new_tokens
    again = stage_identities(load_recipe(write_recipe(tmp_path / "c", ckpt, None)))
    assert again == unset


def test_bundled_data_without_a_recipe(ckpt, tmp_path, lengths):
    out = tmp_path / "scores.json"
    res = invoke("eval", ckpt, "--domains", "bundled:math,bundled:instructions,addition", "--size", "3",
                 "--batch-size", "2", "--out", out, "--threads", "1")
    assert res.exit_code == 0, res.output
    # bundled data: as far as the qwen recipe decodes it; a character puzzle: the default eval.max_new_tokens
    assert lengths == [BUNDLED_MAX_NEW_TOKENS] * 4 + [12] * 2
    data = json.loads(out.read_text())
    assert set(data["domains"]) == {"math", "instructions", "addition"}
    assert data["max_new_tokens"] == {"math": 384, "instructions": 384, "addition": 12}
    assert all(len(v["rewards"]) == 3 for v in data["domains"].values())


def test_bundled_data_is_declared_as_the_qwen_recipe_declares_it():
    qwen = yaml.safe_load(bundled_recipe("qwen3_0.6b").read_text())
    as_recipe = {d["source"].split(":", 1)[1]: {k: v for k, v in d.items() if k not in ("name", "source")}
                 for d in qwen["domains"]}
    assert as_recipe == BUNDLED_DATA and qwen["eval"]["max_new_tokens"] == BUNDLED_MAX_NEW_TOKENS


def test_mistakes_are_one_line_before_any_compute(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "sample", lambda *a, **k: pytest.fail("sampled after a mistake"))
    line = one_error_line(invoke("eval", ckpt, "--domains", "addition,nope"))
    assert "unknown domain 'nope'" in line and "bundled:math" in line
    line = one_error_line(invoke("eval", ckpt, "--domains", "bundled:poetry"))
    assert "no bundled data set 'poetry'" in line and "bundled:code" in line
    assert "name at least one domain" in one_error_line(invoke("eval", ckpt))
    recipe = write_recipe(tmp_path / "r", ckpt)
    line = one_error_line(invoke("eval", ckpt, "--recipe", recipe, "--domains", "math,sorting"))
    assert "'sorting' is not a domain of recipe 'evalrecipe'" in line and "addition, evalrecipe_echo, math" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("verifier: math", "verifier: poetry"))
    bad_line = one_error_line(invoke("eval", ckpt, "--recipe", bad))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert bad_line == f"error: {err.value}"  # the loader's own line
    assert "no such recipe file" in one_error_line(invoke("eval", ckpt, "--recipe", tmp_path / "missing.yaml"))
    assert "--size" in one_error_line(invoke("eval", ckpt, "--recipe", recipe, "--size", "0"))


def test_a_domains_length_must_be_positive(tmp_path, ckpt):
    with pytest.raises(ValueError, match="max_new_tokens"):
        register_domain("evalrecipe_bad", max_new_tokens=0)
    recipe = write_recipe(tmp_path / "r", ckpt, 0)
    line = one_error_line(invoke("eval", ckpt, "--recipe", recipe))
    assert "max_new_tokens" in line and "greater than 0" in line


def test_the_recipes_prompt_rendering_unless_the_command_line_names_one(ckpt, tmp_path):
    recipe = write_recipe(tmp_path / "r", ckpt)
    raw = yaml.safe_load(recipe.read_text())
    raw.update(chat_template="none", chat_template_kwargs={"enable_thinking": False})
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = plan_eval(None, recipe)
    assert (plan.chat_template, plan.template_kwargs) == ("none", {"enable_thinking": False})
    assert plan.max_new_tokens is None and plan.settings.size == 4
    assert plan_eval("math", recipe, chat_template="auto").chat_template == "auto"
