"""Load-time checks of where rewards and preference pairs come from (`reward:`, `pairs_from: {dataset}`): each
mistake one RecipeError line before compute.

- A domain with no rule-based reward (`Domain.rule_reward` False, e.g. `style`) cannot be rewarded by
  `reward: verifier` in a stage that uses rewards (a PPO stage on `style` needs a judge or a reward model).
- `reward: {reward_model: X}`: X is a `reward_model` stage or a directory holding a sequence classifier.
- `reward: {judge: X}`: X is a causal LM: not a `reward_model` stage, not a directory of a classifier.
- `reward: {per_domain: {D: SOURCE}}`: each D is a domain the stage rewards; each SOURCE is checked as above.
- A `reward_model` stage is named only where a model scores (a reward source, a ppo critic): never as a model
  that generates (an init, a teacher, a reference, an eval stage's model).
- A preference dataset is read now (every pair checked: chosen differs from rejected) and its path made absolute
  (relative to the recipe), so a stage finds it from any working directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.errors import RecipeError
from ..core.schema import (
    CascadeRLStage,
    DatasetPairs,
    DPOStage,
    JudgeReward,
    MOPDStage,
    Recipe,
    RejectionSamplingStage,
    RewardModelReward,
    RewardModelStage,
    SamplingSettings,
    reward_of,
    reward_parts,
    source_of,
)
from ..data.pairs import read_pairs
from ..models.checkpoint import head_kind
from .refs import StageFacts, resolve_external, stage_roots
from .tokenizer import tokenizer_alphabet, tokenizer_settings


def _scores(key: tuple) -> bool:
    """Whether a reference at `key` is one where a reward_model stage may be named: a reward source, a critic."""
    return key == ("critic",) or (key[0] == "reward" and key[-1] == "reward_model")


def rewarded_domains(stage, domains: Sequence[str]) -> list[str]:
    """The domains whose rows a stage rewards (an empty list: it uses no reward); `domains`: the stage's."""
    if isinstance(stage, MOPDStage):
        if stage.alpha > 0:
            return list(domains)
        return [d for d in domains if d not in stage.teachers]  # reward-only domains
    if isinstance(stage, CascadeRLStage):
        return list(stage.order)
    if isinstance(stage, DPOStage | RewardModelStage) and stage.pairs_from != "policy":
        return []
    if isinstance(stage, SamplingSettings | DPOStage | RewardModelStage | RejectionSamplingStage):
        return list(domains)
    return []


def check_rewards(recipe: Recipe, facts: dict[str, StageFacts], base: Path, domains: dict, order: list[str],
                  where) -> None:
    """Every check of the module docstring; `domains` are the loaded domains, `order` the stages' run order,
    `where(*key)` locates a key."""
    roots = stage_roots(recipe.stages, order, base)
    for name, stage in recipe.stages.items():
        at = lambda *key, name=name: where("stages", name, *key)  # noqa: E731
        reward = reward_of(stage)
        rewarded = rewarded_domains(stage, facts[name].domains)
        for d in rewarded:
            if source_of(reward, d) == "verifier" and not getattr(domains[d], "rule_reward", True):
                raise RecipeError(
                    f"{at('reward')}: domain {d!r} has no rule-based reward; set `reward: {{judge: MODEL, "
                    f"rubric: TEXT}}`, `reward: {{reward_model: MODEL}}` or `reward: {{per_domain: {{{d}: ...}}}}`"
                )
        for key, domain, source in reward_parts(reward):
            if domain is not None and domain not in rewarded:
                raise RecipeError(f"{at('reward', *key)}: this stage rewards no rows of domain {domain!r} (it "
                                  f"rewards {', '.join(rewarded) or 'none'})")
            if isinstance(source, RewardModelReward):
                _check_model(recipe, base, source.reward_model, at("reward", *key, "reward_model"),
                             want="sequence_classifier")
            elif isinstance(source, JudgeReward):
                _check_model(recipe, base, source.judge, at("reward", *key, "judge"), want="causal_lm")
                _check_rubric(recipe, roots, source, at("reward", *key, "rubric"))
        for d in getattr(stage, "domain_thresholds", None) or {}:
            if d not in rewarded:
                raise RecipeError(f"{at('domain_thresholds', d)}: {d!r} is not one of the stage's domains "
                                  f"({', '.join(rewarded)})")
        for key, ref in facts[name].refs:
            if isinstance(recipe.stages.get(ref), RewardModelStage) and not _scores(key):
                raise RecipeError(f"{at(*key)}: {ref!r} is a reward model: it scores answers, it does not generate "
                                  "(use it as `reward: {reward_model: ...}` or as a ppo `critic`)")
        pairs = getattr(stage, "pairs_from", None)
        if isinstance(pairs, DatasetPairs):
            path = Path(pairs.dataset).expanduser()
            path = path if path.is_absolute() else base / path
            try:
                read_pairs(path)
            except ValueError as e:
                raise RecipeError(f"{at('pairs_from', 'dataset')}: {e}") from None
            pairs.dataset = str(path.resolve())


def _check_model(recipe: Recipe, base: Path, ref: str, at: str, *, want: str) -> None:
    """`ref` (a stage or an external directory) is a reward model (`sequence_classifier`) or a causal LM."""
    if ref in recipe.stages:
        kind = "sequence_classifier" if isinstance(recipe.stages[ref], RewardModelStage) else "causal_lm"
    else:
        external = resolve_external(ref, base)
        kind = head_kind(external) if external and Path(external).is_dir() else want  # a Hub id: checked at start
    if kind == want:
        return
    what = KIND_NAMES[kind]
    if want == "causal_lm":
        raise RecipeError(f"{at}: {ref!r} is a {what}, not a causal LM: a judge scores a completion by its token "
                          "probabilities (use `reward: {reward_model: ...}` for a reward model)")
    raise RecipeError(f"{at}: {ref!r} is not a reward model (a `reward_model` stage or a sequence-classification "
                      f"directory); it is a {what}")


KIND_NAMES = {"sequence_classifier": "reward model (a sequence classifier)",
              "token_classifier": "critic (a token classifier)", "causal_lm": "causal LM"}


def _check_rubric(recipe: Recipe, roots: dict[str, str], reward: JudgeReward, at: str) -> None:
    """A judge built from scratch reads its pretrain stage's tokenizer: a rubric character outside its alphabet
    would read as <unk>, so the rubric would not say what it says."""
    if roots.get(reward.judge) != "scratch":  # a stage descending from a model built here
        return
    alphabet = tokenizer_alphabet(tokenizer_settings(recipe, reward.judge) or recipe.tokenizer)
    unknown = sorted(set(reward.rubric) - set(alphabet))
    if unknown:
        raise RecipeError(f"{at}: characters {''.join(unknown)!r} are not in the judge's tokenizer alphabet "
                          f"({alphabet!r}); they would read as <unk>")
