"""The `auto` step settings (`learner.sizing`): the tiny recipes keep the computation they always ran, a real
vocabulary gets blocks and micro-batches, the recipe's own settings win, and a smaller budget gives smaller passes."""

from __future__ import annotations

from mopd.core.schema import MOPDStage
from mopd.learner.sizing import BLOCK_ROWS, ModelShape, StepShape, choose_sizing, estimate_peak

GIB = 2**30


def _shape(vocab: int, hidden: int, layers: int, trained: bool) -> ModelShape:
    params = vocab * hidden + layers * 12 * hidden * hidden
    return ModelShape(vocab=vocab, hidden=hidden, layers=layers, intermediate=3 * hidden, kv_width=hidden // 2,
                      weight_bytes=4 * params, trained=params if trained else 0, dtype_bytes=4)


def _stage(**kw) -> MOPDStage:
    return MOPDStage(kind="mopd", init="s", steps=1, teachers={"d": "t"}, **kw)


TINY = (_shape(40, 128, 2, True), [_shape(40, 128, 2, False)])
REAL = (_shape(151_936, 256, 4, True), [_shape(151_936, 512, 6, False)])  # issue 35's shape


def test_tiny_recipes_keep_one_block_and_the_whole_batch() -> None:
    z = choose_sizing(_stage(objective="full_reverse_kl", batch_size=64), "full_reverse_kl", *TINY,
                      StepShape(rows=64, prompt_columns=20, max_new_tokens=12, group_size=1), "cpu", 8 * GIB)
    assert (z.micro_batch_size, z.logit_chunk, z.vocab_block, z.by_length, z.shared_prefill) == (None, None, None,
                                                                                                  False, False)
    assert set(z.chosen) == {"micro_batch_size", "logit_chunk", "micro_batch_by_length", "teacher_shared_prefill"}


def test_real_vocabulary_gets_vocab_blocks_or_wide_position_blocks() -> None:
    step = StepShape(rows=16, prompt_columns=64, max_new_tokens=128, group_size=1)
    sampled = choose_sizing(_stage(), "sampled", *REAL, step, "cpu", 8 * GIB)
    # 16 rows of 192 columns, 33 MB of activations a row: 256 MiB a pass -> two passes of 8 rows, by length
    assert sampled.micro_batch_size == 8 and sampled.by_length
    assert sampled.vocab_block is not None and 512 <= sampled.vocab_block <= 8192
    full = choose_sizing(_stage(objective="full_reverse_kl"), "full_reverse_kl", *REAL, step, "cpu", 8 * GIB)
    assert full.vocab_block is None and full.logit_chunk is not None
    assert full.logit_chunk * full.micro_batch_size >= BLOCK_ROWS // 2  # GEMMs of hundreds of rows, not 32
    assert "1 vocabulary" not in sampled.line() and "GiB budget" in sampled.line()


def test_recipe_settings_win() -> None:
    step = StepShape(rows=16, prompt_columns=64, max_new_tokens=128, group_size=4)
    z = choose_sizing(_stage(micro_batch_size=4, logit_chunk=8, micro_batch_by_length=False,
                             teacher_shared_prefill=True), "sampled", *REAL, step, "cpu", 8 * GIB)
    assert (z.micro_batch_size, z.logit_chunk, z.vocab_block, z.by_length, z.shared_prefill) == (4, 8, None, False,
                                                                                                  True)
    assert z.chosen == ()


def test_a_smaller_budget_gives_smaller_passes_and_a_lower_estimate() -> None:
    step = StepShape(rows=64, prompt_columns=64, max_new_tokens=512, group_size=8)
    roomy = choose_sizing(_stage(), "sampled", *REAL, step, "cuda", 64 * GIB)  # 4 GiB of activations: 32 rows
    tight = choose_sizing(_stage(), "sampled", *REAL, step, "cuda", 2 * GIB)
    assert tight.micro_batch_size < roomy.micro_batch_size
    assert tight.estimated_peak_bytes <= 2 * GIB < roomy.estimated_peak_bytes
    # the estimate grows with the rows a pass
    s, t = REAL
    assert estimate_peak(s, t, step, 8, 0) > estimate_peak(s, t, step, 2, 0)
    # shared prefill: 8 rollouts per prompt of 64 tokens, 8 groups: 3,584 shared tokens -> not yet worth it
    assert not roomy.shared_prefill
    long_prompts = choose_sizing(_stage(), "sampled", *REAL, StepShape(64, 128, 512, 8), "cuda", 64 * GIB)
    assert long_prompts.shared_prefill
