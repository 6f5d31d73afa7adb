"""An eval stage scores each model with that model's own tokenizer, not the recipe's character tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from mopd.envs import ALPHABET
from mopd.execution.runner import run_recipe
from mopd.models.checkpoint import save_checkpoint
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.load import load_recipe
from mopd.stages import driver as driver_module


def test_eval_stage_uses_the_scored_models_own_tokenizer(tmp_path: Path, monkeypatch) -> None:
    # A model whose vocabulary is a superset of the recipe's: upper-case letters sort before lower-case ones, so
    # every letter has a different id than in the recipe's tokenizer.
    own = build_char_tokenizer(ALPHABET + "ABC")
    recipe_tok = build_char_tokenizer(ALPHABET)
    assert own.convert_tokens_to_ids("a") != recipe_tok.convert_tokens_to_ids("a")
    model = build_tiny_model(TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16),
                             len(own), own, 0)
    save_checkpoint(tmp_path / "hf_model", model, own, {"stage": "external"})
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        "name: evalonly\ndomains: [reversal]\neval: {size: 8, max_new_tokens: 4}\n"
        f"stages:\n  score: {{kind: eval, models: ['{tmp_path / 'hf_model'}']}}\n"
    )
    seen: list[dict] = []
    real = driver_module.evaluate

    def spy(model, tokenizer, *args, **kwargs):
        seen.append(tokenizer.get_vocab())
        return real(model, tokenizer, *args, **kwargs)

    monkeypatch.setattr(driver_module, "evaluate", spy)
    run_recipe(load_recipe(recipe), tmp_path / "run")
    assert seen == [own.get_vocab()]
    results = json.loads((tmp_path / "run" / "score" / "final" / "eval.json").read_text())
    assert set(next(iter(results.values()))) == {"reversal"}
