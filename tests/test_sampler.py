"""The sampler's recorded logprobs are the ones training recomputes, and padding never changes a row."""

from __future__ import annotations

import torch

from mopd.core.logprobs import token_logprobs
from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import filter_top_p, sample


def _model():
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, len(tok), tok, seed=0).eval(), tok


def test_sampler_logprobs_match_training_forward() -> None:
    model, tok = _model()
    prompts = ["12+3=", "rev:abcdef=", "sort:cba="] * 4
    batch = sample(model, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    lp = token_logprobs(sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T), batch.input_ids_B_T)
    mask = batch.completion_mask_B_T
    assert mask.sum() > 0
    assert torch.allclose(lp * mask, batch.sampler_logprobs_B_T, atol=1e-5)


def test_greedy_row_independent_of_batch_padding() -> None:
    model, tok = _model()
    alone = sample(model, tok, ["1+2="], max_new_tokens=6, temperature=0.0).completions[0]
    padded = sample(model, tok, ["rev:abcdefgh=", "1+2="], max_new_tokens=6, temperature=0.0).completions[1]
    assert alone == padded


def test_completion_mask_stops_after_eos() -> None:
    model, tok = _model()
    batch = sample(model, tok, ["1+2="] * 64, max_new_tokens=8, generator=torch.Generator().manual_seed(1))
    for row_ids, row_mask in zip(batch.input_ids_B_T, batch.completion_mask_B_T, strict=True):
        where = row_mask.nonzero().flatten().tolist()
        assert where == list(range(where[0], where[0] + len(where)))  # one contiguous completion
        toks = row_ids[where].tolist()
        if tok.eos_token_id in toks:
            assert toks.index(tok.eos_token_id) == len(toks) - 1  # nothing is scored after EOS


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_top_p(probs.log(), 0.75).exp()
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(filter_top_p(probs.log(), 1e-3).exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_seeded_sampling_is_reproducible() -> None:
    model, tok = _model()
    a = sample(model, tok, ["1+2="] * 8, max_new_tokens=5, generator=torch.Generator().manual_seed(3))
    b = sample(model, tok, ["1+2="] * 8, max_new_tokens=5, generator=torch.Generator().manual_seed(3))
    assert a.completions == b.completions
