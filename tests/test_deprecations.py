"""No deprecated transformers API in mopd's calls, and the suite's filter that keeps it so (pyproject.toml)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mopd.core.schema import TinyModelConfig
from mopd.envs import ALPHABET
from mopd.models.prompting import RAW
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample

KWARG_MESSAGE = ("`past_key_values` is deprecated and will be removed in version 5.40.0 for "
                 "`Qwen3ForCausalLM.forward`. Use `cache` instead.")


def warn_from(module: str, category: type[Warning], message: str = "x is deprecated") -> None:
    warnings.warn_explicit(message, category, f"/somewhere/{module.replace('.', '/')}.py", 1, module=module)


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_the_suite_turns_deprecations_from_mopd_calls_into_errors(category):
    with pytest.raises(category):
        warn_from("mopd.sampling.sampler", category)
    with pytest.raises(category):  # a deprecated keyword mopd hands a model's forward (via Module.__call__)
        warn_from("torch.nn.modules.module", category, KWARG_MESSAGE)


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecations_inside_third_party_code_stay_warnings(category):
    with pytest.warns(category):
        warn_from("peft.peft_model", category)
    with pytest.warns(category):
        warn_from("torch.nn.modules.module", category, "`foo` is deprecated for `Qwen3DecoderLayer.forward`")
    with pytest.warns(category):
        warn_from("mopd_plugin_my_domains_0123", category)  # a user's plugin is not mopd


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_sampling_warns_nothing_and_matches_a_full_forward(arch):
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(arch=arch, hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate_size=32)
    model = build_tiny_model(cfg, len(tok), tok, seed=0).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = sample(model, tok, ["12+3=", "rev:abc="], max_new_tokens=6, temperature=0.0)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))], \
        [str(w.message) for w in caught]
    # the cached decode gives what an uncached greedy decode of the same rows gives
    for row, prompt in enumerate(["12+3=", "rev:abc="]):
        ids = RAW.token_ids(tok, prompt)
        sampled = batch.input_ids_B_T[row][batch.completion_mask_B_T[row] == 1].tolist()
        assert sampled
        for tok_id in sampled:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            assert int(logits.argmax()) == tok_id
            ids.append(tok_id)
