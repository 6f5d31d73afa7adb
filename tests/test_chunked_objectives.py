"""Chunked logits (`logit_chunk`): every objective's loss, metrics and gradient computed a block of positions at a
time equal the unchunked ones (to float rounding, checked in float64), on ragged rows routed to two teachers, with
block sizes that do not divide the window; the split LM head is the model's own forward; and a chunked
full-vocabulary step never makes (nor keeps for backward) logits of every position, for the student or the
teacher."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM

from mopd.core.batch import RolloutBatch, rollout_batch
from mopd.core.position_blocks import block_bounds
from mopd.core.schema import MOPDStage, RLVRStage, TrainStage, fixed_logit_chunk
from mopd.envs import Problem
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.supervised import supervised_loss
from mopd.models.forward import final_hidden, sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import SETTINGS_NOT_IN_IDENTITY
from mopd.teachers.panel import TeacherPanel

from .rounding import decoder_path_terms, gamma, head_logprob_tol, two_path_grad_tol

TOK = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789+-=")
TINY = TinyModelConfig(hidden_size=16, layers=2, heads=2, kv_heads=1, intermediate_size=24)
SAMPLING = dict(group_size=2, max_new_tokens=9, temperature=1.0, top_p=1.0, is_mode="truncate", eps_low=0.5,
                eps_high=2.0, adv_clip=5.0)
BASE = MOPDStage(kind="mopd", init="x", steps=1, teachers={"a": "t_a", "b": "t_b"}, alpha=0.0, **SAMPLING)
CASES = {
    "sampled": BASE,
    "sampled+grpo+surprise, T=0.7": BASE.model_copy(update={"alpha": 0.5, "surprise_alpha": 0.7, "temperature": 0.7}),
    "topk+grpo": BASE.model_copy(update={"objective": "topk", "topk": 5, "alpha": 0.3}),
    "full_reverse_kl": BASE.model_copy(update={"objective": "full_reverse_kl"}),
    "forward_kl, T=1.3": BASE.model_copy(update={"objective": "forward_kl", "temperature": 1.3, "alpha": 0.2}),
    "jsd": BASE.model_copy(update={"objective": "jsd", "jsd_beta": 0.3}),
    "grpo": RLVRStage(kind="rlvr", init="x", steps=1, **SAMPLING),
}
F64 = dict(rtol=1e-10, atol=1e-12)


def _models(dtype=torch.float64):
    student = build_tiny_model(TINY, len(TOK), TOK, 0).to(dtype)
    untied = TINY.model_copy(update={"arch": "llama", "tie_embeddings": False})
    teachers = {"t_a": build_tiny_model(TINY, len(TOK), TOK, 1), "t_b": build_tiny_model(untied, len(TOK), TOK, 2)}
    for t in teachers.values():
        t.to(dtype).eval().requires_grad_(False)
    return student, teachers


def _batch(seed: int = 0, rows: int = 6, width: int = 9) -> RolloutBatch:
    """Ragged rows: left-padded prompts of 2..7 tokens, completions of 1..`width` tokens (right-padded), two
    domains, groups of two, rewards that differ within some groups, sampler logprobs near the student's."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    P, V = 7, len(TOK)
    prompt_ids = torch.full((rows, P), TOK.pad_token_id)
    prompt_mask = torch.zeros(rows, P, dtype=torch.long)
    comp_ids = torch.full((rows, width), TOK.pad_token_id)
    comp_mask = torch.zeros(rows, width)
    lengths = [width, 1, *[rng.randint(1, width) for _ in range(rows - 2)]]
    for i in range(rows):
        p = rng.randint(2, P)
        prompt_ids[i, P - p :] = torch.randint(3, V, (p,), generator=g)
        prompt_mask[i, P - p :] = 1
        comp_ids[i, : lengths[i]] = torch.randint(3, V, (lengths[i],), generator=g)
        comp_mask[i, : lengths[i]] = 1
    logprobs = -torch.rand(rows, width, generator=g) * 3 * comp_mask
    batch = rollout_batch(prompt_ids, prompt_mask, comp_ids, logprobs, comp_mask, prompts=[""] * rows,
                          completions=[""] * rows, domains=["a", "b", "b", "a", "a", "b"][:rows],
                          group_ids=[i // 2 for i in range(rows)])
    return batch.with_rewards(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])[:rows])


def _on_policy(student, batch: RolloutBatch, temperature: float) -> RolloutBatch:
    """The sampler's logprobs = the student's own (at the sampling temperature): every token stays in the
    importance-ratio window, so the policy-gradient terms carry gradient."""
    with torch.no_grad():
        logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T)[:, :-1] / temperature
        lp = logits.log_softmax(-1).gather(-1, batch.input_ids_B_T[:, 1:, None]).squeeze(-1)
    sampler = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * batch.completion_mask_B_T
    batch.sampler_logprobs_B_T = sampler.float()
    return batch


def _step(student, panel, batch, settings, chunk, micro=None, vocab_block=None):
    student.zero_grad(set_to_none=True)
    distill = settings if isinstance(settings, MOPDStage) else None
    cfg = PolicyConfig(sampling=settings, distill=distill, teachers=panel if distill else None)
    panel.logit_chunk = chunk
    loss, metrics = policy_loss(student, batch, cfg, temperature=settings.temperature, micro_batch_size=micro,
                                logit_chunk=chunk, vocab_block=vocab_block)
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in student.named_parameters()}


def _assert_same(ref, got, **tol) -> None:
    (ref_loss, ref_metrics, ref_grads), (loss, metrics, grads) = ref, got
    assert loss == pytest.approx(ref_loss, rel=1e-10, abs=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for k, v in ref_metrics.items():
        assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_chunked_step_equals_unchunked_for_every_objective(case: str) -> None:
    """Loss, metrics and the gradient of every student parameter (the tied embedding / LM head, attention and
    MLP weights of both layers) with blocks of 1 and 4 of the 9 predicting positions (and of 2 within
    micro-batches) equal one block's, in float64; rows go to two teachers (one with an untied head)."""
    student, teachers = _models()
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    settings = CASES[case]
    batch = _on_policy(student, _batch(), settings.temperature)
    ref = _step(student, panel, batch, settings, None)
    assert any(g.abs().max() > 0 for g in ref[2].values())
    for chunk in (1, 4):
        _assert_same(ref, _step(student, panel, batch, settings, chunk), **F64)
    # within micro-batches too (against the same micro-batches in one block: the policy-gradient loss sums in
    # float32, so splitting rows is compared with itself)
    _assert_same(_step(student, panel, batch, settings, None, micro=4), _step(student, panel, batch, settings, 2,
                                                                            micro=4), **F64)


def test_chunked_step_in_float32_is_float_rounding() -> None:
    """The same in float32 (what runs): against the float64 step of the same weights, several blocks (where the
    fused KL runs, `learner.fused_kl`) and one block (the composed functions) are both within float32 rounding of
    the exact loss and of every exact gradient, a bound derived from the computation (tests/rounding.py), not the
    error one of them happens to make on this CPU."""
    student, teachers = _models(torch.float32)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    settings = CASES["full_reverse_kl"]
    batch = _on_policy(student, _batch(1), 1.0)
    one = _step(student, panel, batch, settings, None)
    several = _step(student, panel, batch, settings, 3)
    panel64 = TeacherPanel(models={k: copy.deepcopy(m).double() for k, m in teachers.items()},
                           teacher_of_domain={"a": "t_a", "b": "t_b"})
    truth = _step(copy.deepcopy(student).double(), panel64, batch, settings, None)
    # One float32 path against exact (float64) math: half the two-path bound. Windows of 16 positions, 54 tokens;
    # the loss is a token mean of KL terms sum_v p_v (log p_v - log q_v), each log-softmax within 2 gamma(N) S of
    # exact (S the largest |logit| of the three models), so a term within 4 gamma(N) S. A block's positions
    # misplaced or a KL term's gradient wrong moves these by O(1/9) of their scale.
    positions, tokens = batch.input_ids_B_T.shape[1], batch.completion_mask_B_T.numel()
    with torch.no_grad():
        S = max(float(sequence_logits(m, batch.input_ids_B_T, batch.attention_mask_B_T).abs().max())
                for m in (student, *teachers.values()))
    loss_tol = gamma(decoder_path_terms(TINY, positions, len(TOK)) + tokens) * 4 * S
    grad_tol = two_path_grad_tol(TINY, positions, len(TOK), tokens, truth[2]) / 2
    for got in (one, several):
        assert got[0] == pytest.approx(truth[0], rel=0, abs=loss_tol)
        for name, g in truth[2].items():
            torch.testing.assert_close(got[2][name].double(), g, rtol=0, atol=grad_tol,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_sft_nll_equals_unchunked() -> None:
    """SFT's token NLL and its gradient, over whole rows of ragged (left-padded) prompt + answer."""
    student, _ = _models()
    problems = [Problem(prompt=p, answer=a, domain="a", difficulty=1)
                for p, a in (("ab+c=", "xyz1"), ("a=", "q"), ("abcdefg+hij=", "0123456"))]

    def nll(chunk):
        student.zero_grad(set_to_none=True)
        loss, metrics = supervised_loss(student, TOK, problems, loss_on_prompt=False, logit_chunk=chunk)
        loss.backward()
        return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in student.named_parameters()}

    ref = nll(None)
    for chunk in (1, 3, 5):
        _assert_same(ref, nll(chunk), **F64)


def test_panel_scores_in_blocks_equal_one_block() -> None:
    """The panel's sampled-token logprobs, top-k and full logits, a block of positions at a time, equal the
    whole window's (multi-teacher routing, rows trimmed of their all-padding columns)."""
    _, teachers = _models(torch.float32)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    batch = _batch(2)
    names = panel.route(batch)
    ref_lp, ref_top = panel.sampled_logprobs(batch, names), panel.topk(batch, names, 4, 9)
    blocks = panel.logit_blocks(batch, names, 10)
    whole = blocks(0, 10)
    # Each teacher's decoder runs on the same rows and columns whatever the block: only the head's GEMM (of a
    # block's rows: another kernel, by CPU) and the log-softmax differ, so two block sizes are within twice
    # `head_logprob_tol` (~1e-5 here); a block's positions misplaced moves a logprob by O(0.1).
    tol = 2 * max(head_logprob_tol(t, batch.input_ids_B_T, batch.attention_mask_B_T) for t in teachers.values())
    top_lp, top_ids, _ = ref_top
    top5 = whole[:, :-1].log_softmax(-1).topk(5, -1).values  # where the top-4 (and its order) is not determined:
    near_tie = ((top5[..., :-1] - top5[..., 1:]) <= 2 * tol).any(-1)  # two of the top 5 within rounding
    for chunk in (1, 2, 4):
        panel.logit_chunk = chunk
        torch.testing.assert_close(panel.sampled_logprobs(batch, names), ref_lp, rtol=0, atol=tol)
        lp, ids, sampled = panel.topk(batch, names, 4, 9)
        torch.testing.assert_close(lp, top_lp, rtol=0, atol=tol)
        torch.testing.assert_close(sampled, ref_top[2], rtol=0, atol=tol)
        assert torch.equal(ids[~near_tie], top_ids[~near_tie])
        parts = [blocks(s, e) for s, e in block_bounds(10, chunk)]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=0, atol=tol)
    assert near_tie.float().mean() < 0.1  # the ids are checked at (nearly) every position
    torch.testing.assert_close(panel.full_logits(batch, names, 9), whole[:, :-1])


def test_block_bounds() -> None:
    assert block_bounds(10, None) == [(0, 10)] and block_bounds(10, 9) == [(0, 10)]
    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]  # the last predicting-free position rides along


def _gemma2():
    cfg = Gemma2Config(vocab_size=len(TOK), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=3.0,
                       pad_token_id=TOK.pad_token_id)
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg)


def _lora():
    peft = pytest.importorskip("peft")
    base = build_tiny_model(TINY.model_copy(update={"tie_embeddings": False}), len(TOK), TOK, 3)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    return peft.get_peft_model(base, cfg)


@pytest.mark.parametrize("build", [
    lambda: build_tiny_model(TINY, len(TOK), TOK, 0),  # qwen3, tied embeddings
    lambda: build_tiny_model(TINY.model_copy(update={"arch": "llama", "tie_embeddings": False}), len(TOK), TOK, 0),
    _gemma2,  # final logit softcapping
    _lora,  # peft wrapper, an adapted LM head
], ids=["qwen3-tied", "llama-untied", "gemma2-softcap", "lora-head"])
def test_split_head_is_the_models_own_forward(build) -> None:
    """head(final hidden states) == the model's logits, at the last K positions and at all of them."""
    model = build().eval()
    batch = _batch(3)
    ids, mask = batch.input_ids_B_T, batch.attention_mask_B_T
    with torch.no_grad():
        for keep in (0, 5):
            hidden, head = final_hidden(model, ids, mask, keep=keep)
            assert head.projection is not None  # split, not the identity fallback
            torch.testing.assert_close(head(hidden), sequence_logits(model, ids, mask, logits_to_keep=keep),
                                       rtol=1e-6, atol=1e-6)


def test_logit_chunk_setting_is_outside_the_identity() -> None:
    """Chunking changes only float rounding (as micro-batches do), so a finished stage is not rerun for it."""
    assert "logit_chunk" in SETTINGS_NOT_IN_IDENTITY and "memory_budget_gib" in SETTINGS_NOT_IN_IDENTITY
    # `auto` outside the sampling stages: one block for the tiny recipes' windows
    assert fixed_logit_chunk(TrainStage.model_validate({"steps": 1})) >= 64


class _LogitProbe(TorchDispatchMode):
    """The largest tensor with the vocabulary as its last dimension that any op produces, forward, recompute and
    backward alike: logits, their log-softmax and their gradients all have that shape."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def _saved_logit_numel(vocab: int):
    """Pack hook counting the vocabulary-sized tensors autograd keeps for backward (outside checkpointed
    blocks: those keep nothing)."""
    box = [0]

    def pack(t: torch.Tensor):
        if t.dim() >= 2 and t.shape[-1] == vocab:
            box[0] += t.numel()
        return t

    return box, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def test_chunked_full_vocabulary_step_never_holds_every_positions_logits() -> None:
    """At V = 32,000 and K - 1 = 48 completion positions: unchunked, the step makes [B, K, V] logits and keeps
    them for backward; with blocks of 4 positions the largest vocabulary-sized tensor of the whole step (student
    and teachers, forward and backward) is one block's, and nothing vocabulary-sized is kept between forward and
    backward. Memory of the logits grows with the block, not with K x V."""
    V, rows, width = 32_000, 2, 48
    cfg = TINY.model_copy(update={"hidden_size": 8, "heads": 2, "intermediate_size": 8, "layers": 1})
    tok_v = type("Tok", (), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})()
    student = build_tiny_model(cfg, V, tok_v, 0)
    teachers = {"t_a": build_tiny_model(cfg, V, tok_v, 1), "t_b": build_tiny_model(cfg, V, tok_v, 2)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    panel = TeacherPanel(models=teachers, teacher_of_domain={"a": "t_a", "b": "t_b"})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (rows, width), generator=g)
    batch = rollout_batch(torch.randint(3, V, (rows, 3), generator=g), torch.ones(rows, 3, dtype=torch.long), ids,
                          torch.zeros(rows, width), torch.ones(rows, width), prompts=["", ""], completions=["", ""],
                          domains=["a", "b"]).with_rewards(torch.zeros(rows))
    settings = BASE.model_copy(update={"objective": "full_reverse_kl", "max_new_tokens": width})
    K = width + 1

    def measure(chunk):
        panel.logit_chunk = chunk
        probe, (saved, hooks) = _LogitProbe(V), _saved_logit_numel(V)
        with probe, hooks:
            loss, _ = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                                  temperature=1.0, logit_chunk=chunk)
            loss.backward()
        return probe.largest, saved[0]

    largest, saved = measure(None)
    assert largest >= rows * K * V and saved >= rows * K * V  # the probe sees the whole window's logits
    for chunk in (4, 8):
        largest, saved = measure(chunk)
        assert largest <= rows * (chunk + 1) * V, (chunk, largest)
        assert saved == 0


class _HeadRows(TorchDispatchMode):
    """Rows of every vocabulary projection (a matmul whose output is V wide), summed."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
        if func in matmuls and out.shape[-1] == self.vocab:  # (a strided block of hidden states takes bmm)
            self.rows += out.numel() // self.vocab
        return out


@pytest.mark.parametrize("objective", ["sampled", "full_reverse_kl"])
def test_chunked_blocks_project_no_row_that_is_padding_there(objective: str) -> None:
    """With several blocks, a block projects only the rows with a completion token among its positions, for the
    student and the teacher: on ragged rows (completions of 1..9 tokens) the step's vocabulary projections are
    exactly those rows' positions, fewer than every row's, and the loss is the one-block loss."""
    student, teachers = _models()
    panel = TeacherPanel(models={"t_a": teachers["t_a"]}, teacher_of_domain={"a": "t_a", "b": "t_a"})
    settings = BASE.model_copy(update={"objective": objective, "teachers": {"a": "t_a", "b": "t_a"}})
    batch = _on_policy(student, _batch(), 1.0)
    cfg = PolicyConfig(sampling=settings, distill=settings, teachers=panel)
    K = batch.input_ids_B_T.shape[1] - int(batch.completion_mask_B_T.any(0).long().argmax()) + 1
    live_B_W = batch.completion_mask_B_T[:, -(K - 1) :] > 0
    with torch.no_grad():
        panel.logit_chunk = None
        whole, _ = policy_loss(student, batch, cfg, temperature=1.0, logit_chunk=None)
        for chunk in (1, 4):
            panel.logit_chunk = chunk
            bounds = block_bounds(K, chunk)
            per_model = sum(int(live_B_W[:, s : min(e, K - 1)].any(1).sum()) * (e - s) for s, e in bounds)
            with _HeadRows(len(TOK)) as probe:
                loss, _ = policy_loss(student, batch, cfg, temperature=1.0, logit_chunk=chunk)
            assert probe.rows == 2 * per_model  # the student's blocks and the teacher's
            assert per_model < batch.size * K
            assert float(loss) == pytest.approx(float(whole), rel=1e-10)
