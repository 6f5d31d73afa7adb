"""Sampling schedules of rlvr/mopd stages: temperature schedule, difficulty filter, difficulty curriculum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mopd.envs import ALPHABET, get_domain
from mopd.execution.resolve import resolve_stage
from mopd.learner.filters import solved_group_filter
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import RecipeError, load_recipe
from mopd.recipe.tokenizer import scratch_tokenizer
from mopd.sampling.sampler import sample
from mopd.stages.problems import ProblemSource, problem_source, step_rng
from mopd.stages.schedules import curriculum_levels, temperature_at

from .conftest import MINI_RECIPE
from .rounding import two_path_logprob_tol


def test_linear_temperature_schedule_values() -> None:
    assert [temperature_at(s, 5, 1.2, 0.4, "linear") for s in range(5)] == pytest.approx([1.2, 1.0, 0.8, 0.6, 0.4])
    assert [temperature_at(s, 3, 0.5, 1.5, "linear") for s in range(3)] == pytest.approx([0.5, 1.0, 1.5])  # rising
    assert temperature_at(0, 1, 0.7, 0.2, "linear") == 0.7  # a one-step stage samples at the start value
    assert temperature_at(7, 10, 0.9, None, "constant") == 0.9


def test_sampler_logprobs_are_those_of_the_tempered_distribution() -> None:
    """At a scheduled temperature T the recorded logprob is log softmax(logits / T)[y], not the T = 1 one."""
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
    model = build_tiny_model(cfg, len(tok), tok, 0).eval()
    T = temperature_at(2, 5, 2.0, 0.5, "linear")  # 1.25
    batch = sample(model, tok, ["rev:abc=", "add:1+2="], max_new_tokens=4, temperature=T,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T)[:, :-1]
    ids = batch.input_ids_B_T[:, 1:, None]
    tempered = (logits / T).log_softmax(-1).gather(-1, ids).squeeze(-1)
    untempered = logits.log_softmax(-1).gather(-1, ids).squeeze(-1)
    m = batch.completion_mask_B_T[:, 1:] > 0
    # the KV-cached sampler and the full forward round differently (tests/rounding.py, logits / T being what is
    # log-softmaxed); the check can tell: T = 1 instead of 1.25 moves the logprobs by more than that
    tol = two_path_logprob_tol(cfg, logits / T)
    torch.testing.assert_close(batch.sampler_logprobs_B_T[:, 1:][m], tempered[m], atol=tol, rtol=0)
    assert (batch.sampler_logprobs_B_T[:, 1:][m] - untempered[m]).abs().max() > tol


def test_solved_group_filter_masks_exactly_all_pass_and_no_pass_groups() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.5, 0.2, 0.0, 1.0, 1.0, 1.0, 0.9, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 7, 7, 7])  # pass rates 1, 0, 2/3, 1/3
    keep, metrics = solved_group_filter(rewards, groups)
    assert keep.tolist() == [False] * 6 + [True] * 6
    assert metrics == {"filter/kept_frac": 0.5, "filter/all_solved_frac": 0.25, "filter/none_solved_frac": 0.25}


def test_curriculum_levels_rise_linearly() -> None:
    assert [curriculum_levels([3, 1, 2], s, 30) for s in (0, 9, 10, 19, 20, 29)] == [
        [1], [1], [1, 2], [1, 2], [1, 2, 3], [1, 2, 3]
    ]
    assert curriculum_levels([1, 2, 3], 0, 1) == [1]


def _source(tmp_path: Path, curriculum: bool) -> ProblemSource:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["teacher_add"].update(curriculum=curriculum, steps=30)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_recipe(path, check_tokenizers=False)
    out = tmp_path / "out"
    # resolving a stage reads its starting checkpoint's tokenizer: the parent `sft` has not run, give it the recipe's
    scratch_tokenizer(loaded.recipe, loaded.recipe.tokenizer, loaded.domains).save_pretrained(out / "sft" / "final")
    return problem_source(resolve_stage(loaded, "teacher_add", out, stage_identities(loaded)))


def test_curriculum_draws_only_level_one_early_and_all_levels_late(tmp_path: Path) -> None:
    source = _source(tmp_path, curriculum=True)
    early = {p.difficulty for s in range(10) for p in source.draw(step_rng(0, s), 16, step=s)}
    late = {p.difficulty for s in range(20, 30) for p in source.draw(step_rng(0, s), 16, step=s)}
    assert early == {1} and late == {1, 2, 3}
    # deterministic in (seed, step): a resumed stage draws the same problems
    assert source.draw(step_rng(0, 12), 8, step=12) == _source(tmp_path, True).draw(step_rng(0, 12), 8, step=12)
    plain = _source(tmp_path, curriculum=False)
    assert {p.difficulty for s in range(10) for p in plain.draw(step_rng(0, s), 16, step=s)} == {1, 2, 3}


def _load_error(tmp_path: Path, stage: str, **keys) -> str:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"][stage].update(keys)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:")
    return msg


@pytest.mark.parametrize(
    "stage, keys, where, what",
    [
        ("student", {"group_size": 1, "alpha": 0.0, "filter_solved": True}, "stages.student.filter_solved",
         "group_size >= 2"),
        ("teacher_add", {"group_size": 1, "filter_solved": True}, "stages.teacher_add.filter_solved",
         "group_size >= 2"),
        ("student", {"temperature_schedule": "linear"}, "stages.student.temperature_schedule", "temperature_end"),
        ("student", {"temperature_end": 0.5}, "stages.student.temperature_end", "schedule is constant"),
        ("student", {"objective": "jsd", "surprise_alpha": 0.5}, "stages.student.surprise_alpha",
         "objective: sampled"),
        ("student", {"preflight": {"kl_warn": 0.1, "prompt": 3}}, "stages.student.preflight.prompt", "unknown key"),
        ("student", {"domain_weights": {"shift": 2.0}}, "stages.student.domain_weights.shift",
         "not one of the stage's domains (addition, reversal, sorting)"),
        ("teacher_add", {"domain_weights": {"addition": 0}}, "stages.teacher_add.domain_weights.addition",
         "must be above 0"),
    ],
)
def test_bad_schedule_settings_fail_at_load(tmp_path: Path, stage, keys, where, what) -> None:
    msg = _load_error(tmp_path, stage, **keys)
    assert where in msg and what in msg
    line = int(msg.split(":")[1])
    key = where.split(".")[-1]
    assert (tmp_path / "bad.yaml").read_text().splitlines()[line - 1].strip().startswith(f"{key}:")


def test_good_schedule_settings_load(tmp_path: Path) -> None:
    data = yaml.safe_load(MINI_RECIPE)
    data["stages"]["student"].update(temperature_schedule="linear", temperature=1.2, temperature_end=0.6,
                                     filter_solved=True, curriculum=True, surprise_alpha=0.5)
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    s = load_recipe(path).recipe.stages["student"]
    assert (s.temperature_end, s.filter_solved, s.curriculum, s.surprise_alpha) == (0.6, True, True, 0.5)
    assert (s.preflight.enabled, s.preflight.kl_warn, s.preflight.prompts) == (True, 0.1, 32)


def test_domain_weights_set_each_domains_share_of_a_step_and_stay_out_of_identity_when_unset(tmp_path: Path) -> None:
    three = ProblemSource(domains=[get_domain(n) for n in ("addition", "reversal", "sorting")],
                          exclude={n: frozenset() for n in ("addition", "reversal", "sorting")})
    counts = lambda src, n: {d: sum(p.domain == d for p in src.draw(step_rng(0, 1), n))  # noqa: E731
                             for d in ("addition", "reversal", "sorting")}
    assert counts(three, 12) == {"addition": 4, "reversal": 4, "sorting": 4}
    three.weights = {"reversal": 2.0}  # 1 : 2 : 1
    assert counts(three, 12) == {"addition": 3, "reversal": 6, "sorting": 3}
    assert counts(three, 7) == {"addition": 2, "reversal": 3, "sorting": 2}  # 1.75, 3.5, 1.75: largest remainders
    assert three.draw(step_rng(0, 5), 9) == three.draw(step_rng(0, 5), 9)  # deterministic in (seed, step)

    def ids(student_keys: dict) -> dict:
        d = yaml.safe_load(MINI_RECIPE)
        d["stages"]["student"].update(student_keys)
        path = tmp_path / "w.yaml"
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return stage_identities(load_recipe(path, check_tokenizers=False))

    plain = ids({})
    assert ids({"domain_weights": None}) == plain  # finished runs keep their identities
    weighted = ids({"domain_weights": {"sorting": 2.0}})
    assert weighted["student"] != plain["student"] and weighted["teacher_add"] == plain["teacher_add"]
