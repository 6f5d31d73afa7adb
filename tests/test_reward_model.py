"""The reward_model stage (issue 20): the Bradley-Terry loss against values computed by hand, and a miniature
recipe training reward models on policy pairs and on a JSONL dataset, each saved as a checkpoint that
`AutoModelForSequenceClassification` opens and that scores as the stage's reward function does."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from mopd.envs import Problem
from mopd.execution.runner import run_recipe
from mopd.learner.reward_model import bradley_terry_loss, reward_model_reward
from mopd.models.checkpoint import load_model
from mopd.models.integrity import stage_output_problem
from mopd.recipe.load import load_recipe


def test_bradley_terry_loss_by_hand() -> None:
    """Scores chosen (2, 0, 3), rejected (1, 1, 3): margins 1, -1, 0.
    -log sigmoid(1) = log(1 + e^-1) = 0.3132617, -log sigmoid(-1) = log(1 + e) = 1.3132617,
    -log sigmoid(0) = log 2 = 0.6931472; mean 0.7732235. Accuracy 1/3 (a tie is not a win), mean margin 0."""
    loss, m = bradley_terry_loss(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0]))
    assert float(loss) == pytest.approx(0.7732235, abs=1e-6)
    assert m["rm/accuracy"] == pytest.approx(1 / 3) and m["rm/margin"] == pytest.approx(0.0)


def test_bradley_terry_gradient_by_hand() -> None:
    """d/dr_c of -log sigmoid(r_c - r_r) / P = -(1 - sigmoid(m)) / P: margins 1 and -1, P = 2:
    -(1 - 0.7310586) / 2 = -0.1344707 and -(1 - 0.2689414) / 2 = -0.3655293; r_r gets the opposite."""
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected)[0].backward()
    assert chosen.grad.tolist() == pytest.approx([-0.1344707, -0.3655293], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.1344707, 0.3655293], abs=1e-6)


RECIPE = textwrap.dedent(
    """\
    name: rm
    seed: 0
    domains: [addition, reversal]
    eval: {size: 6, max_new_tokens: 6}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 4
        batch_size: 8
      rm:
        kind: reward_model
        init: base
        steps: 3
        batch_size: 4
        group_size: 4
        max_new_tokens: 6
        eval_pairs: 6
        lr: 0.01
      rm_data:
        kind: reward_model
        init: base
        pairs_from: {dataset: pairs.jsonl}
        steps: 4
        batch_size: 8
        lr: 0.01
    """
)


def _pairs(path: Path) -> None:
    """20 pairs: the right sum over a wrong one (2 held out: the 10th and 20th)."""
    rows = [{"prompt": f"{a}+{a + 1}=", "chosen": str(2 * a + 1), "rejected": str(2 * a + 2)} for a in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reward_models_train_save_and_reopen_as_sequence_classifiers(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    _pairs(tmp_path / "pairs.jsonl")
    loaded = load_recipe(tmp_path / "r.yaml")
    assert loaded.recipe.stages["rm_data"].pairs_from.dataset == str((tmp_path / "pairs.jsonl").resolve())
    out = tmp_path / "out"
    run_recipe(loaded, out, Console(quiet=True))
    for name in ("rm", "rm_data"):
        assert stage_output_problem(out / name) is None, name
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "rm/pairs" in r]
        assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
        final = rows[-1]
        assert 0.0 <= final["eval/preference_pairs"] <= 1.0, name
    data_rows = [json.loads(x) for x in (out / "rm_data" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rm/pairs"] == 8 for r in data_rows if "rm/pairs" in r)  # batch_size pairs of the 18 trained
    lineage = json.loads((out / "rm_data" / "final" / "mopd.json").read_text())
    assert lineage["metrics"]["eval"]["preference_pairs"]["pairs"] == 2

    # the saved reward model is an HF sequence classifier whose score is the stage's reward (sigmoid of it)
    final = out / "rm_data" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    # a resumed stage (and a `reward: {reward_model: ...}` consumer) loads it back as the classifier it is
    assert type(load_model(final)).__name__ == "Qwen3ForSequenceClassification"
    p = Problem(prompt="3+4=", answer="7", domain="addition", difficulty=1)
    ids = [tok.bos_token_id, *tok("3+4=", add_special_tokens=False).input_ids, *tok("7", add_special_tokens=False).input_ids,
           tok.eos_token_id]
    with torch.no_grad():
        score = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    (reward,) = reward_model_reward(model, tok)([p], ["7"])
    assert reward == pytest.approx(1 / (1 + math.exp(-score)), rel=1e-5)


def test_dataset_pairs_whose_chosen_equals_rejected_are_refused_at_load(tmp_path: Path) -> None:
    from mopd.core.errors import RecipeError

    _pairs(tmp_path / "pairs.jsonl")
    lines = (tmp_path / "pairs.jsonl").read_text().splitlines()
    lines[3] = json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "r.yaml").write_text(RECIPE)
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "r.yaml")
    msg = str(e.value)
    assert "stages.rm_data.pairs_from.dataset" in msg and "pairs.jsonl:4: chosen equals rejected" in msg
    assert "\n" not in msg


def test_a_dataset_enters_the_identity_by_its_content_not_its_path(tmp_path: Path) -> None:
    from mopd.recipe.identity import stage_identities

    ids = []
    for where, tweak in (("a", False), ("b", False), ("c", True)):
        d = tmp_path / where
        d.mkdir()
        _pairs(d / "pairs.jsonl")
        if tweak:  # one more pair: other data, another stage
            with (d / "pairs.jsonl").open("a") as f:
                f.write(json.dumps({"prompt": "9+9=", "chosen": "18", "rejected": "19"}) + "\n")
        (d / "r.yaml").write_text(RECIPE)
        ids.append(stage_identities(load_recipe(d / "r.yaml"))["rm_data"])
    assert ids[0] == ids[1] != ids[2]
