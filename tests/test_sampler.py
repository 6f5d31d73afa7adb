"""The sampler's recorded logprobs are the ones training recomputes, and padding never changes a row."""

from __future__ import annotations

import torch

from mopd.core.logprobs import token_logprobs
from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling import sampler
from mopd.sampling.sampler import filter_top_p, sample

from .rounding import two_path_logprob_tol

CFG = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)


def _model():
    tok = build_char_tokenizer(ALPHABET)
    return build_tiny_model(CFG, len(tok), tok, seed=0).eval(), tok


def test_sampler_logprobs_match_training_forward() -> None:
    model, tok = _model()
    prompts = ["12+3=", "rev:abcdef=", "sort:cba="] * 4
    batch = sample(model, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T)
    lp = token_logprobs(logits, batch.input_ids_B_T)
    mask = batch.completion_mask_B_T
    assert mask.sum() > 0
    # KV-cached decode and full forward: float32 rounding of two kernel paths (tests/rounding.py, ~5e-4 here); a
    # logprob of the wrong position or row is off by O(0.1)
    torch.testing.assert_close(lp * mask, batch.sampler_logprobs_B_T, atol=two_path_logprob_tol(CFG, logits), rtol=0)


def test_greedy_row_independent_of_batch_padding() -> None:
    model, tok = _model()
    alone = sample(model, tok, ["1+2="], max_new_tokens=6, temperature=0.0)
    padded = sample(model, tok, ["rev:abcdefgh=", "1+2="], max_new_tokens=6, temperature=0.0).completions[1]
    # One row and two rows take different GEMM kernels, so the two runs' logits round differently (by CPU). The
    # same greedy tokens are determined where every step's top-2 logit margin exceeds what rounding can move it
    # by: both runs' logits, and this forward's, are within gamma(N) S of the exact ones (a quarter of the
    # two-path logprob bound), so a margin here above 4 gamma(N) S is positive in both runs, on any CPU.
    with torch.no_grad():
        logits = sequence_logits(model, alone.input_ids_B_T, alone.attention_mask_B_T)[0, :-1]
    steps = alone.completion_mask_B_T[0, 1:] > 0  # positions whose next token the sampler chose
    top2 = logits[steps].topk(2, -1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > two_path_logprob_tol(CFG, logits[None])
    assert alone.completions[0] == padded


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


def test_cdf_draw_follows_the_probabilities_and_never_draws_zero_mass() -> None:
    """The real-vocabulary draw: over 12,000 draws from V = 4,100 tokens (16 blocks of 256 and a tail of 4) with
    mass on six tokens (two in one block, two on either side of a block edge, the last token in the tail) and none
    elsewhere, each token's frequency is its probability within 5 standard errors, and no zero-mass token is ever
    drawn."""
    V, rows, rounds = 4100, 3000, 4  # 16 blocks of 256 tokens and a 4-token tail
    mass = {7: 0.4, 8: 0.2, 255: 0.1, 256: 0.1, 4000: 0.15, V - 1: 0.05}
    probs = torch.zeros(rows, V)
    for tok, p in mass.items():
        probs[:, tok] = p
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([sampler.cdf_draw(probs, g) for _ in range(rounds)])
    n = rows * rounds
    assert set(drawn.unique().tolist()) <= set(mass)
    for tok, p in mass.items():
        freq = float((drawn == tok).float().mean())
        assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5, (tok, freq, p)


def test_the_draw_is_multinomials_below_a_real_vocabulary_and_the_cdfs_from_it() -> None:
    """Every recorded number used `torch.multinomial`: below `CDF_DRAW_MIN_VOCAB` tokens `next_tokens` draws exactly
    its tokens from the same seed; from it on, `cdf_draw`'s. The logprob is the drawn token's either way."""
    for V, draw in ((47, lambda p, g: torch.multinomial(p, 1, generator=g).squeeze(-1)),
                    (sampler.CDF_DRAW_MIN_VOCAB, sampler.cdf_draw)):
        logits = torch.randn(16, V, generator=torch.Generator().manual_seed(1)) * 3
        tok, lp = sampler.next_tokens(logits, 0.8, 0.9, torch.Generator().manual_seed(2))
        dist_lp = sampler.filter_top_p((logits / 0.8).log_softmax(-1), 0.9)
        assert torch.equal(tok, draw(dist_lp.exp(), torch.Generator().manual_seed(2)))
        assert torch.equal(lp, dist_lp.gather(-1, tok[:, None]).squeeze(-1))
        assert torch.isfinite(lp).all()  # never a token top-p removed
