"""No work on padding, no prompt recomputed, and nothing changes: the shared prefill and the shrinking decode batch
give the same tokens and logprobs as prefilling and decoding every row (issue 17, item 2).

The two paths run their forwards on different numbers of rows, and which GEMM and attention kernels a row count
gets (hence how a row's logits round) depends on the CPU: bit-for-bit equality in float32 holds on the machine it
was measured on, not on every CPU CI may have. So the model runs in float64, where the two paths' logits differ
by ~1e-16 relative; the sampler rounds them to float32 (`.float()`) before drawing, which makes the float32 logits
identical except with probability ~2^-29 per logit, and a different token would further need a draw within one
float32 ulp of a tie. Tokens are compared exactly; logprobs to the effect of one float32 ulp in the logits.
"""

from __future__ import annotations

import pytest
import torch

from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling import sampler
from mopd.sampling.sampler import MIN_ROWS, shared_prefill_rows

from .rounding import sampler_logprob_tol


def _model(eos_bias: float):
    """A tiny random model (float64: see the module docstring) whose EOS logit is raised by `eos_bias`, so that
    rows finish at different steps."""
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(arch="qwen3", hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128,
                          tie_embeddings=False)
    model = build_tiny_model(cfg, len(tok), tok, seed=0).double().eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] += eos_bias * model.model.norm.weight.sign()
    return model, tok


def _rows_per_forward(model) -> tuple[list[int], callable]:
    seen: list[int] = []
    handle = model.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]),
                                               with_kwargs=True)
    return seen, handle.remove


def _both(model, tok, prompts, **kw):
    common = dict(max_new_tokens=24, top_p=1.0, domains=None, group_ids=None, references=None,
                  prompt_format=sampler.RAW, **kw)
    seen, remove = _rows_per_forward(model)
    new = sampler._sample(model, tok, prompts, generator=torch.Generator().manual_seed(5), **common)
    remove()
    old = sampler._sample(model, tok, prompts, generator=torch.Generator().manual_seed(5), share_prefill=False,
                          drop_finished=False, **common)
    return new, old, seen


PROMPTS = [p for p in ["12+3=", "rev:abcdef=", "sort:cba=", "shift:xyz+1=", "9="] for _ in range(8)]  # G = 8
MANY = [f"{p}{i}" for p in PROMPTS[::8] for i in range(4) for _ in range(8)]  # 20 distinct prompts, G = 8


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _same(new, old, model, temperature: float) -> None:
    assert torch.equal(new.input_ids_B_T, old.input_ids_B_T)
    assert torch.equal(new.completion_mask_B_T, old.completion_mask_B_T)
    assert new.completions == old.completions
    # Each path's float32 logprob is within `sampler_logprob_tol` of the exact one (both draw from float32 roundings
    # of float64 logits); a bug (a wrong row's cache, a position off by one) moves a logprob by O(0.1).
    with torch.no_grad():
        logits = sequence_logits(model, new.input_ids_B_T, new.attention_mask_B_T)
    tol = 2 * sampler_logprob_tol(logits / (temperature or 1.0))
    torch.testing.assert_close(new.sampler_logprobs_B_T, old.sampler_logprobs_B_T, atol=tol, rtol=0)


def test_seeded_sampling_identical_with_shared_prefill_and_finished_rows_dropped(threads) -> None:
    model, tok = _model(eos_bias=0.0)
    for temperature in (1.0, 0.7):
        new, old, seen = _both(model, tok, PROMPTS, temperature=temperature)
        _same(new, old, model, temperature)
        lengths = new.completion_mask_B_T.sum(-1)
        assert lengths.min() < lengths.max()  # rows finished at different steps
        assert seen[0] == MIN_ROWS < len(PROMPTS)  # 5 distinct prompts, padded up to MIN_ROWS rows
        assert min(seen[1:]) < len(PROMPTS)  # the decode batch shrank as rows finished...
        assert min(seen[1:]) >= MIN_ROWS  # ...never below MIN_ROWS


def test_greedy_identical_and_decode_stops_computing_finished_rows(threads) -> None:
    model, tok = _model(eos_bias=1.5)
    new, old, seen = _both(model, tok, MANY, temperature=0.0)
    _same(new, old, model, 0.0)
    lengths = new.completion_mask_B_T.sum(-1)
    assert lengths.min() < lengths.max()
    assert seen[0] == 20  # each distinct prompt once
    # decoded rows: fewer than one per live row per step plus the finished rows (what decoding every row costs)
    assert sum(seen[1:]) < len(MANY) * (len(seen) - 1)


def test_prefill_rows_each_distinct_prompt_once_padded_to_min_rows() -> None:
    distinct = [str(i) for i in range(MIN_ROWS)]
    assert shared_prefill_rows(distinct * 4) == (list(range(MIN_ROWS)), list(range(MIN_ROWS)) * 4)
    # 2 distinct prompts of width 4 are 8 token rows: repeated rows are added back up to MIN_ROWS (16)
    prompts = ["a", "b"] * 12  # 2 distinct prompts: rows of repeats are added back up to MIN_ROWS (16)
    chosen, inverse = shared_prefill_rows(prompts)
    assert chosen == [0, 1, *range(2, 16)] and inverse == [0, 1] * 12
    assert shared_prefill_rows(["a", "b", "c"]) == ([0, 1, 2], [0, 1, 2])  # every row distinct
