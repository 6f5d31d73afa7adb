"""The judge reward and the `style` domain (issue 20): the judge score against an independent computation, the
style measure by hand, per-domain reward sources routed row by row, and a miniature recipe whose rlvr, dpo and
rejection_sampling stages on `style` are rewarded by a judge (one of the run's own models) and by a reward model,
and whose mixed stage rewards `addition` by its verifier and `style` by the judge."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console

from mopd.envs import ALPHABET, Problem, get_domain
from mopd.execution.runner import run_recipe
from mopd.learner.judge import judge_scores
from mopd.learner.rollout import rewards_by_domain
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import load_recipe

from .rounding import gamma, two_path_logprob_tol

TOK = build_char_tokenizer(ALPHABET)


def test_judge_score_is_the_geometric_mean_probability_after_the_rubric() -> None:
    """Recomputed by hand: the row [BOS] rubric prompt completion [EOS]; the judge's logprob of each completion
    token and of EOS; exp of their mean."""
    cfg = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
    judge = build_tiny_model(cfg, len(TOK), TOK, 3).eval()
    rows = [Problem(prompt="style:cat=", answer="c-a-t", domain="style", difficulty=1),
            Problem(prompt="style:dogs=", answer="d-o-g-s", domain="style", difficulty=1)]
    completions = ["c-a-t", "xyz"]
    got = judge_scores(judge, TOK, rows, completions, rubric="neat: ")
    for i, (p, c) in enumerate(zip(rows, completions, strict=True)):
        prefix = [TOK.bos_token_id, *TOK("neat: " + p.prompt, add_special_tokens=False).input_ids]
        target = [*TOK(c, add_special_tokens=False).input_ids, TOK.eos_token_id]
        ids = torch.tensor([prefix + target])
        with torch.no_grad():
            logits = sequence_logits(judge, ids, torch.ones_like(ids))
        lp = logits[0, :-1].log_softmax(-1)
        token_lp = [float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(target)]
        # the judge scores both rows in one padded batch, this each alone: their logprobs differ by float32
        # rounding of two kernel paths (tests/rounding.py), and exp(mean + d) = exp(mean) (1 + d) to first order
        rel = two_path_logprob_tol(cfg, logits) + 2 * gamma(len(target) + 2)
        assert float(got[i]) == pytest.approx(math.exp(sum(token_lp) / len(token_lp)), rel=rel)
    assert all(0 < float(x) <= 1 for x in got)


def test_style_measure_by_hand() -> None:
    """style:cat= (reference c-a-t, 5 chars): `c-a-t` 5/5; `cat` hits c, then 'a' where a dash belongs (no), 't'
    at an even place (yes): 2/5; `t-c-a-x` 6 of 7 positions (x is no letter of the word) over max(7, 5)."""
    style = get_domain("style")
    p = Problem(prompt="style:cat=", answer="c-a-t", domain="style", difficulty=1)
    assert style.verify(p, "c-a-t") == 1.0
    assert style.verify(p, "cat") == pytest.approx(2 / 5)
    assert style.verify(p, "t-c-a-x") == pytest.approx(6 / 7)
    assert style.verify(p, "") == 0.0
    assert style.rule_reward is False and get_domain("addition").rule_reward is True


def test_per_domain_rewards_route_each_row_to_its_domains_source_in_order() -> None:
    """Listed domains go to their source, one call each with their rows in order; the others to their verifier."""
    calls: list[list[str]] = []

    def judge(rows: list[Problem], completions: list[str]) -> list[float]:
        calls.append([p.prompt for p in rows])
        return [0.25 + 0.5 * (c == "c-a-t") for c in completions]

    add = get_domain("addition")
    rows = [Problem(prompt="1+2=", answer="3", domain="addition", difficulty=1),
            Problem(prompt="style:cat=", answer="c-a-t", domain="style", difficulty=1),
            Problem(prompt="2+2=", answer="4", domain="addition", difficulty=1),
            Problem(prompt="style:cat=", answer="c-a-t", domain="style", difficulty=1)]
    completions = ["3", "c-a-t", "5", "cat"]
    rewards = rewards_by_domain({"style": judge}, {"addition": add, "style": get_domain("style")})(rows, completions)
    assert rewards == [add.verify(rows[0], "3"), 0.75, add.verify(rows[2], "5"), 0.25]
    assert rewards[0] == 1.0 and rewards[2] < 1.0  # the verifier's own values, not the judge's
    assert calls == [["style:cat=", "style:cat="]]


RECIPE = textwrap.dedent(
    """\
    name: judged
    seed: 0
    domains: [addition, style]
    eval: {size: 2, max_new_tokens: 6}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 4
        batch_size: 8
      rm:
        kind: reward_model
        init: base
        domains: [style]
        reward: {judge: base, rubric: "neat "}
        steps: 2
        batch_size: 4
        group_size: 3
        max_new_tokens: 8
        eval_pairs: 4
      rl:
        kind: rlvr
        init: base
        domains: [style]
        reward: {judge: base, rubric: "neat "}
        steps: 2
        batch_size: 4
        group_size: 2
        max_new_tokens: 8
      dpo:
        kind: dpo
        init: base
        domains: [style]
        reward: {reward_model: rm}
        steps: 1
        batch_size: 4
        group_size: 3
        max_new_tokens: 8
      mixed:
        kind: rlvr
        init: base
        domains: [addition, style]
        reward: {per_domain: {style: {judge: base, rubric: "neat "}}}
        steps: 2
        batch_size: 4
        group_size: 2
        max_new_tokens: 8
      rs:
        kind: rejection_sampling
        init: base
        domains: [style]
        reward: {judge: base, rubric: "neat "}
        n: 2
        threshold: 0.0
        steps: 1
        batch_size: 4
        max_new_tokens: 8
      rs_strict:
        kind: rejection_sampling
        init: base
        domains: [style]
        reward: {judge: base, rubric: "neat "}
        n: 2
        steps: 1
        batch_size: 4
        max_new_tokens: 8
      rs_style:
        kind: rejection_sampling
        init: base
        domains: [style]
        reward: {judge: base, rubric: "neat "}
        n: 2
        domain_thresholds: {style: 0.0}
        steps: 1
        batch_size: 4
        max_new_tokens: 8
    """
)


def test_judge_and_reward_model_rewards_drive_stages_on_the_style_domain(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    run_recipe(load_recipe(tmp_path / "r.yaml"), out, Console(quiet=True))

    def rows(stage: str) -> list[dict]:
        return [json.loads(x) for x in (out / stage / "metrics.jsonl").read_text().splitlines()]

    rl = [r for r in rows("rl") if "reward/style" in r]
    assert len(rl) == 2 and all(0 < r["reward/style"] <= 1 for r in rl)  # judge scores: in (0, 1], never rules
    assert rows("rl")[-1]["eval/style"] >= 0.0  # the held-out score is the style measure
    mixed = [r for r in rows("mixed") if "reward/style" in r or "reward/addition" in r]
    assert mixed and all(0 < r["reward/style"] <= 1 for r in mixed if "reward/style" in r)
    assert {"reward/style", "reward/addition"} <= {k for r in mixed for k in r}  # one stage, both sources
    assert any(r.get("rm/pairs", 0) > 0 for r in rows("rm"))  # the judge ranks the samples into pairs
    assert any(r.get("dpo/pairs", 0) > 0 for r in rows("dpo"))  # ... and so does the reward model
    rs = [r for r in rows("rs") if "rejection/best_reward" in r]
    assert rs and 0 < rs[0]["rejection/best_reward"] <= 1 and rs[0]["rejection/kept_frac"] == 1.0
    # a judge's score is a probability below 1: at the default threshold 1.0 nothing is kept, and a per-domain
    # threshold lets the judged domain's best answers through (the same draws: rs_style equals rs_strict but for it)
    strict, style = ([r for r in rows(s) if "rejection/kept_frac" in r][0] for s in ("rs_strict", "rs_style"))
    assert 0 < strict["rejection/best_reward"] < 1 and strict["rejection/kept_frac"] == 0.0
    assert style["rejection/best_reward"] == strict["rejection/best_reward"] and style["rejection/kept_frac"] == 1.0


def _reward_model_dir(directory: Path, alphabet: str) -> Path:
    """A tiny HF sequence-classification directory (a reward model) over a character vocabulary of `alphabet`."""
    from mopd.models.heads import scalar_head_model

    tok = build_char_tokenizer(alphabet)
    causal = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16),
                              len(tok), tok, 0)
    causal.save_pretrained(directory / "lm")
    tok.save_pretrained(directory / "lm")
    rm = scalar_head_model(directory / "lm", "sequence_classifier", pad_token_id=tok.pad_token_id,
                           dtype=torch.float32)
    rm.save_pretrained(directory / "rm")
    tok.save_pretrained(directory / "rm")
    return directory / "rm"


STAGE = textwrap.dedent(
    """\
    name: bad
    domains: [style]
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 16, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 32}
        steps: 1
      tune:
        kind: rlvr
        init: base
        steps: 1
        reward: REWARD
    """
)


@pytest.mark.parametrize(("alphabet", "reward", "says"), [
    (ALPHABET, "{judge: ./models/rm, rubric: neat}", "stages.tune.reward.judge: './models/rm' is a reward model "
     "(a sequence classifier), not a causal LM"),
    ("0123456789+=", "{reward_model: ./models/rm}", "stages.tune.reward.reward_model: reward model './models/rm' "
     "uses a different tokenizer from the policy 'base'"),
])
def test_a_judge_directory_that_is_a_classifier_and_a_foreign_reward_model_are_refused(
    tmp_path: Path, alphabet: str, reward: str, says: str
) -> None:
    from mopd.core.errors import RecipeError

    _reward_model_dir(tmp_path / "models", alphabet)
    (tmp_path / "r.yaml").write_text(STAGE.replace("REWARD", reward))
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    assert says in str(e.value) and "\n" not in str(e.value)
