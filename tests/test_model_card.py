"""The model card a checkpoint directory carries: Hub metadata (eval results in model-index form) and lineage."""

from __future__ import annotations

import json

import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.core.schema import TinyModelConfig
from mopd.envs import ALPHABET
from mopd.models.model_card import CARD_FILE, domain_scores, write_model_card
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer

LINEAGE = {
    "stage": "student", "kind": "mopd", "identity": "8f0e5cae2e7c22ee", "init": "/runs/x/sft/final",
    "init_stage": "sft", "parents": {"sft": "8e7d", "t_add": "037c"}, "seed": 7, "step": 400, "version": "0.1.0",
    "teachers": {"addition": {"stage": "t_add", "identity": "037c", "checkpoint": "/runs/x/t_add/final"}},
    "settings": {"kind": "mopd", "domains": None, "lr": 0.001, "objective": "sampled"},
    "metrics": {"eval": {"addition": {"score": 0.75, "accuracy": 0.5}, "reversal": {"score": 0.25, "accuracy": 0.125}},
                "samples": 25600, "teacher_samples": 0},
}


def test_the_card_parses_back_with_its_metadata_and_eval_results(tmp_path):
    path = write_model_card(tmp_path, LINEAGE)
    assert path == tmp_path / CARD_FILE
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "sft" and data.model_name == "student"
    assert {"mopd", "stage-mopd", "domain-addition", "domain-reversal"} <= set(data.tags)
    assert data.datasets == ["addition", "reversal"]
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("addition", "score"): 0.75, ("addition", "accuracy"): 0.5,
                       ("reversal", "score"): 0.25, ("reversal", "accuracy"): 0.125}
    # the model-index block the Hub reads
    index = data.to_dict()["model-index"]
    assert index[0]["name"] == "student" and len(index[0]["results"]) == 2
    # the body: the lineage and the stage's final metrics
    assert "8f0e5cae2e7c22ee" in card.text and "| samples | 25600 |" in card.text and "t_add" in card.text
    assert json.loads(card.text.split("```json\n")[1].split("\n```")[0]) == LINEAGE["settings"]


def test_explicit_scores_replace_the_lineage_eval_and_training_metrics_are_listed(tmp_path):
    write_model_card(tmp_path, LINEAGE, eval_scores={"sorting": {"score": 1.0, "accuracy": 1.0}},
                     train_metrics={"loss": 0.125})
    card = ModelCard.load(tmp_path / CARD_FILE)
    assert {r.dataset_name for r in card.data.eval_results} == {"sorting"}
    assert "| loss | 0.125 |" in card.text


def test_a_checkpoint_without_scores_gets_a_card_without_model_index(tmp_path):
    lineage = {"stage": "base", "kind": "pretrain", "init": None, "init_stage": None, "metrics": {},
               "settings": {"domains": ["addition"]}}
    card = ModelCard.load(write_model_card(tmp_path, lineage))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert card.data.base_model is None and "domain-addition" in card.data.tags


def test_only_domain_scores_become_eval_results():
    nested = {"sft": {"addition": {"score": 0.5}}, "addition": {"score": 0.5, "accuracy": True, "other": 3}}
    assert domain_scores(nested) == {"addition": {"score": 0.5}}


def test_a_card_in_a_checkpoint_directory_leaves_it_loadable(tmp_path):
    tok = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16),
                             len(tok), tok, seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    write_model_card(tmp_path, LINEAGE)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == tok.get_vocab()
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
