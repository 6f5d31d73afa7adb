"""A stage's rules over its own settings live on its schema model, and the defaults that code below the recipe
shares with the schema are written once (`core.schema.defaults`)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydantic import ValidationError

from mopd.core.schema import DEFAULT_REWARD, EvalSettings, MergeStage, MOPDStage, RLVRStage, reward_of
from mopd.envs import get_domain
from mopd.envs.base import Domain
from mopd.envs.data import DataDomain
from mopd.envs.verifiers_env import VerifiersDomain, verifiers_domain
from mopd.learner.losses import policy_gradient_loss
from mopd.recipe.load import RecipeError, load_recipe

from .bad_input_cases import BASE

MOPD = {"kind": "mopd", "init": "base", "teachers": {"addition": "t_add", "reversal": "t_rev"}, "steps": 2,
        "group_size": 2}
HTTP = {"backend": "http", "url": "http://h:8000/v1"}

RULES = [
    ({"temperature_schedule": "linear"}, ("temperature_schedule",), "a linear schedule needs `temperature_end`"),
    ({"temperature_end": 0.5}, ("temperature_end",), "only used by `temperature_schedule: linear`"),
    ({"group_size": 1, "filter_solved": True}, ("filter_solved",), "group_size >= 2 (got 1)"),
    ({"domain_weights": {"addition": 0.0}}, ("domain_weights", "addition"), "a weight must be above 0 (got 0.0)"),
    ({"surprise_alpha": 0.5, "objective": "topk"}, ("surprise_alpha",), "it needs `objective: sampled`"),
    ({"teacher_backends": {"t_ad": {"backend": "actor"}}}, ("teacher_backends",), "'t_ad' is no teacher"),
    ({"objective": "jsd", "teacher_backends": {"t_add": HTTP}}, ("teacher_backends",), "not the full distribution"),
]


@pytest.mark.parametrize(("settings", "key", "says"), RULES, ids=[r[2][:30] for r in RULES])
def test_a_stage_refuses_its_own_rule_at_the_key_in_plain_words(settings: dict, key: tuple, says: str) -> None:
    with pytest.raises(ValidationError) as e:
        MOPDStage.model_validate({**MOPD, **settings})
    err = e.value.errors()[0]
    assert err["loc"] == key and says in err["msg"] and not err["msg"].startswith("Value error")


def test_the_rule_names_its_key_and_line_in_the_recipe(tmp_path: Path) -> None:
    text = BASE.replace("    group_size: 2\n", "    group_size: 2\n    domain_weights: {addition: -1.0}\n", 1)
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert str(e.value) == (f"{tmp_path / 'r.yaml'}:18: stages.teacher_add.domain_weights.addition: a weight must "
                            "be above 0 (got -1.0)")


def _default(fn, name: str):
    return inspect.signature(fn).parameters[name].default


def test_the_loss_defaults_are_the_schema_defaults() -> None:
    fields = RLVRStage.model_fields
    for name in ("is_mode", "eps_low", "eps_high", "adv_clip"):
        assert _default(policy_gradient_loss, name) == fields[name].default, name


def test_every_held_out_set_defaults_to_the_recipe_eval_seed() -> None:
    seed = EvalSettings().seed
    for fn in (Domain.eval_set, Domain.held_out_prompts, DataDomain.eval_set, DataDomain.held_out_prompts,
               DataDomain.__init__, VerifiersDomain.eval_set, VerifiersDomain.held_out_prompts, verifiers_domain):
        assert _default(fn, "seed") == seed, fn.__qualname__
    assert VerifiersDomain.__dataclass_fields__["seed"].default == seed
    assert get_domain("addition").eval_set(4) == get_domain("addition").eval_set(4, seed)


def test_a_stage_without_a_reward_setting_is_rewarded_by_the_default_source() -> None:
    merge = MergeStage.model_validate({"kind": "merge", "base": "a", "models": ["b"]})
    assert reward_of(merge) == DEFAULT_REWARD == RLVRStage.model_fields["reward"].default
    assert reward_of(RLVRStage.model_validate({"kind": "rlvr", "init": "a", "steps": 1})) == DEFAULT_REWARD
