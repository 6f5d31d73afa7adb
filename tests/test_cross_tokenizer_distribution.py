"""Distribution-level objectives across tokenizers (`models.shared_vocab`, `teachers.shared_support`,
`objective_table.restrict_to_shared`): the same tokenizer through the cross path is the same step bit for bit, the
restricted divergences are the math they say, and with a BPE teacher the step's loss is a direct computation's."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mopd.core.batch import rollout_batch
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, get_domain
from mopd.learner.objective_table import PolicyConfig, restrict_to_shared
from mopd.learner.objectives import forward_kl_tokens, jsd_tokens, reverse_kl_tokens, topk_reverse_kl_tokens
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.prompting import RAW
from mopd.models.shared_vocab import shared_vocab
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel

from .test_cross_tokenizer import _loss_and_grads

TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
TOK = build_char_tokenizer(ALPHABET)
DOMAINS = {n: get_domain(n) for n in ("addition", "reversal")}
ROUTES = {"addition": "t_add", "reversal": "t_rev"}
DISTRIBUTION = ("topk", "full_reverse_kl", "forward_kl", "jsd")


def _settings(objective: str, **kw) -> MOPDStage:
    return MOPDStage(kind="mopd", init="x", steps=1, teachers=dict(ROUTES), group_size=2, max_new_tokens=6,
                     temperature=1.0, top_p=1.0, is_mode="truncate", eps_low=0.5, eps_high=2.0, adv_clip=5.0,
                     objective=objective, topk=5, **kw)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("objective", DISTRIBUTION)
def test_same_tokenizer_through_the_cross_path_is_the_same_distribution_step_exactly(objective: str,
                                                                                    alpha: float) -> None:
    """Every chunk is one token and the whole vocabulary is shared when both sides tokenize alike, so restriction
    is the identity: loss and every gradient bit-identical (float64), one teacher foreign and one in process."""
    student = build_tiny_model(TINY, len(TOK), TOK, 0).double()
    teachers = {n: _frozen(build_tiny_model(TINY, len(TOK), TOK, s).double()) for n, s in (("t_add", 1), ("t_rev", 2))}
    rng = random.Random(0)
    problems = [*DOMAINS["addition"].sample_train(rng, 3), *DOMAINS["reversal"].sample_train(rng, 2)]
    settings = _settings(objective, alpha=alpha)
    batch, _ = rollout(student, TOK, problems, DOMAINS, settings, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    local = TeacherPanel(models={"t_add": teachers["t_add"]}, teacher_of_domain=ROUTES)
    own = PanelTeacher(TeacherPanel(models={"t_rev": teachers["t_rev"]}, teacher_of_domain=ROUTES), "t_rev")
    # the same-tokenizer path of a teacher scored outside the local panel (a mixed panel ships top-k in float32)
    native = MixedPanel(local=local, remote={"t_rev": own}, teacher_of_domain=ROUTES)
    cross = MixedPanel(local=local, remote={"t_rev": ForeignTeacher(own, CrossTokenizer(TOK, TOK, RAW))},
                       teacher_of_domain=ROUTES)
    loss_a, grads_a, metrics_a = _loss_and_grads(student, batch, native, settings)
    loss_b, grads_b, metrics_b = _loss_and_grads(student, batch, cross, settings)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
    assert metrics_b["xtok/distribution_token_frac"] == 1.0
    if objective != "topk":
        assert metrics_b["xtok/student_outside_mass"] == 0.0
        # read with the sampled-token logprob, which a panel ships in float32: zero to float32's precision
        assert metrics_b["xtok/teacher_outside_mass"] == pytest.approx(0.0, abs=16 * torch.finfo(torch.float32).eps)


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_restricted_divergences_are_the_divergences_of_the_renormalised_distributions() -> None:
    """Vocabulary of 5, the teacher sharing ids {0, 2, 3} at the first position and nothing at the second: each
    divergence at the first is the one between softmax over the shared logits of each side (by hand), the second
    has no term, and no gradient reaches an id outside the support or a position without a term."""
    s = torch.tensor([[[0.3, 2.0, -1.0, 0.5, 1.5], [1.0, 0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64,
                     requires_grad=True)
    inf = math.inf
    t = torch.tensor([[[1.0, -inf, 0.2, -0.7, -inf], [-inf] * 5]], dtype=torch.float64)
    p, q = _softmax([0.3, -1.0, 0.5]), _softmax([1.0, 0.2, -0.7])
    beta = 0.3
    m = [beta * b + (1 - beta) * a for a, b in zip(p, q, strict=True)]
    expected = {"reverse": _kl(p, q), "forward": _kl(q, p), "jsd": beta * _kl(q, m) + (1 - beta) * _kl(p, m)}
    for name, fn in (("reverse", reverse_kl_tokens), ("forward", forward_kl_tokens),
                     ("jsd", lambda a, b: jsd_tokens(a, b, beta))):
        student, teacher, term = restrict_to_shared(s, t)
        assert term.tolist() == [[True, False]]
        loss = torch.where(term, fn(student, teacher), 0.0)
        assert float(loss[0, 0].detach()) == pytest.approx(expected[name], rel=1e-12)
        s.grad = None
        loss.sum().backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
        assert s.grad[0, 0, [1, 4]].abs().max() == 0 and s.grad[0, 1].abs().max() == 0
        assert s.grad[0, 0, [0, 2, 3]].abs().max() > 0


def test_topk_entries_the_student_lacks_are_no_outcome() -> None:
    """A top-k of 3 where only 2 of the teacher's tokens are shared: the -inf third entry (repeating the first id)
    is no outcome, so the loss is the coarse-grained KL over [id 2, id 0, rest] by hand."""
    s = torch.tensor([[[0.3, 2.0, -1.0, 0.5]]], dtype=torch.float64)
    lp = torch.tensor([[[math.log(0.5), math.log(0.2), -math.inf]]], dtype=torch.float64)
    ids = torch.tensor([[[2, 0, 2]]])
    kl, _, logq_in = topk_reverse_kl_tokens(s, lp, ids)
    p = _softmax([0.3, 2.0, -1.0, 0.5])
    coarse_p, coarse_q = [p[2], p[0], 1 - p[2] - p[0]], [0.5, 0.2, 0.3]
    assert float(kl[0, 0]) == pytest.approx(_kl(coarse_p, coarse_q), rel=1e-12)
    assert float(logq_in.exp()[0, 0]) == pytest.approx(0.7, rel=1e-12)


def _bpe(corpus: list[str], size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's token spelling: a space is `Ġ`) trained on `corpus`, its end token `<|end|>`."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|end|>", pad_token="<|end|>",
                                   padding_side="left", clean_up_tokenization_spaces=False)


BPE = _bpe([f"{a}+{b}= {a + b}" for a in range(60) for b in range(0, 60, 7)] + ["abc: cba", "hello: olleh"], 320)


def test_shared_vocabulary_of_characters_and_a_byte_level_bpe() -> None:
    """Each character of the alphabet is the BPE's token of the same byte (a space its `Ġ`), the end tokens pair,
    and the student's other special tokens have no counterpart."""
    vocab = shared_vocab(TOK, BPE)
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True))
    for ch in ALPHABET:
        assert BPE.convert_ids_to_tokens(pairs[TOK.convert_tokens_to_ids(ch)]) == ("Ġ" if ch == " " else ch)
    assert pairs[TOK.eos_token_id] == BPE.eos_token_id
    assert len(pairs) == len(ALPHABET) + 1  # <pad>, <bos>, <unk> are the student's own
    assert vocab.student_of_teacher[BPE.eos_token_id] == TOK.eos_token_id


def test_shared_vocabulary_of_characters_and_a_sentencepiece_style_bpe() -> None:
    """A metaspace tokenizer (SentencePiece's spelling: `▁` is a space, a dummy space before the text): its
    convention is read from the probe despite the dummy prefix, `▁` pairs with the space, a letter with itself,
    and `▁a` (two bytes) with no character."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    core.train_from_iterator(["ab 12 cba 21", "a b c 1 2"] * 20, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["</s>"], initial_alphabet=[*ALPHABET.replace(" ", ""), "▁"],
        show_progress=False))
    spm = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")
    assert "▁a" in spm.get_vocab()
    vocab = shared_vocab(TOK, spm)
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True))
    assert pairs[TOK.convert_tokens_to_ids(" ")] == spm.convert_tokens_to_ids("▁")
    assert pairs[TOK.convert_tokens_to_ids("a")] == spm.convert_tokens_to_ids("a")
    assert spm.convert_tokens_to_ids("▁a") not in pairs.values()
    assert pairs[TOK.eos_token_id] == spm.eos_token_id


def _rows(prompts: list[str], completions: list[str]):
    """A rewarded batch of the char student's prompts and completions (each ended by its end token)."""
    p_ids = [RAW.token_ids(TOK, p) for p in prompts]
    c_ids = [TOK(c, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id] for c in completions]
    P, N = max(map(len, p_ids)), max(map(len, c_ids))
    prompt = torch.full((len(p_ids), P), TOK.pad_token_id)
    prompt_mask = torch.zeros_like(prompt)
    comp = torch.full((len(c_ids), N), TOK.pad_token_id)
    comp_mask = torch.zeros(len(c_ids), N)
    for b, (p, c) in enumerate(zip(p_ids, c_ids, strict=True)):
        prompt[b, P - len(p):], prompt_mask[b, P - len(p):] = torch.tensor(p), 1
        comp[b, : len(c)], comp_mask[b, : len(c)] = torch.tensor(c), 1
    batch = rollout_batch(prompt, prompt_mask, comp, torch.zeros(len(c_ids), N, dtype=torch.float64), comp_mask,
                          prompts=prompts, completions=completions, domains=["addition"] * len(prompts))
    return batch.with_rewards(torch.zeros(len(prompts))), p_ids, c_ids


@torch.no_grad()
def _direct_loss(student, teacher, objective: str, prompts, completions, p_ids, c_ids, settings) -> float:
    """The step's loss computed from the two models run row by row, without the library's alignment: the BPE's
    tokens of each completion with their character offsets, a teacher token of one character (or the end token)
    is a single-token chunk with a distribution term over the shared characters; every other character gets
    its teacher token's chunk advantage, as -A in the policy-gradient loss at ratio 1."""
    shared_s, shared_t = [], []
    for ch in ALPHABET:
        t_ids = BPE(ch, add_special_tokens=False)["input_ids"]
        shared_s.append(TOK.convert_tokens_to_ids(ch))
        shared_t.append(t_ids[0])
    shared_s.append(TOK.eos_token_id)
    shared_t.append(BPE.eos_token_id)
    total, tokens = 0.0, 0
    for prompt, text, ps, cs in zip(prompts, completions, p_ids, c_ids, strict=True):
        s_lp = torch.log_softmax(student(torch.tensor([ps + cs])).logits[0].double(), -1)
        enc = BPE(text, add_special_tokens=False, return_offsets_mapping=True)
        pt = RAW.token_ids(BPE, prompt)
        t_ids = pt + enc["input_ids"] + [BPE.eos_token_id]
        t_lp = torch.log_softmax(teacher(torch.tensor([t_ids])).logits[0].double(), -1)
        spans = [*enc["offset_mapping"], (len(text), len(text) + 1)]  # the end token: one more "character"
        for j, (a, b) in enumerate(spans):
            s_pos = [len(ps) + k - 1 for k in range(a, b)]  # the student positions predicting characters a..b-1
            t_pos = len(pt) + j - 1
            s_tok, t_tok = [cs[k] for k in range(a, b)], t_ids[len(pt) + j]
            term = b - a == 1
            if term and objective == "topk":
                top = t_lp[t_pos].topk(settings.topk).indices.tolist()
                kept = [shared_s[shared_t.index(i)] for i in top if i in shared_t]
                term = bool(kept)
            if term:
                if objective == "topk":
                    p_k = [math.exp(float(s_lp[s_pos[0], i])) for i in kept]
                    q_k = [math.exp(float(t_lp[t_pos, shared_t[shared_s.index(i)]])) for i in kept]
                    total += _kl([*p_k, 1 - sum(p_k)], [*q_k, 1 - sum(q_k)])
                else:
                    p = torch.softmax(s_lp[s_pos[0], shared_s], -1).tolist()
                    q = torch.softmax(t_lp[t_pos, shared_t], -1).tolist()
                    m = [settings.jsd_beta * y + (1 - settings.jsd_beta) * x for x, y in zip(p, q, strict=True)]
                    total += {"full_reverse_kl": _kl(p, q), "forward_kl": _kl(q, p),
                              "jsd": settings.jsd_beta * _kl(q, m) + (1 - settings.jsd_beta) * _kl(p, m)}[objective]
            else:
                adv = float(t_lp[t_pos, t_tok]) - sum(float(s_lp[i, y]) for i, y in zip(s_pos, s_tok, strict=True))
                total -= max(-settings.adv_clip, min(settings.adv_clip, adv)) * len(s_pos)
        tokens += len(cs)
    return total / tokens


@pytest.mark.parametrize("layout", ["whole", "blocks", "micro-batches"])
@pytest.mark.parametrize("objective", DISTRIBUTION)
def test_a_bpe_teacher_gives_the_directly_computed_loss(objective: str, layout: str) -> None:
    """Character student, byte-level BPE teacher (float64): the step's loss equals `_direct_loss`, in one block of
    positions, in blocks of 2 (checkpointed, the fused KL of `fused_kl`; never `fused_head`, which cannot
    restrict) or in micro-batches of one row, and its gradient is finite."""
    student = build_tiny_model(TINY, len(TOK), TOK, 0).double()
    teacher = _frozen(build_tiny_model(TINY, len(BPE), BPE, 1).double())
    prompts, completions = ["12+34=", "7+5=", "abc:"], [" 46", " 12", " cba"]
    batch, p_ids, c_ids = _rows(prompts, completions)
    with torch.no_grad():  # sampled by this very policy: the importance ratio is 1
        logits = student(batch.input_ids_B_T, attention_mask=batch.attention_mask_B_T).logits.double()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids_B_T[:, 1:, None]).squeeze(-1)
        batch.sampler_logprobs_B_T[:, 1:] = lp * batch.completion_mask_B_T[:, 1:]
    settings = _settings(objective)
    routes = {"addition": "t"}
    foreign = ForeignTeacher(PanelTeacher(TeacherPanel(models={"t": teacher}, teacher_of_domain=routes), "t"),
                             CrossTokenizer(TOK, BPE, RAW))
    panel = MixedPanel(local=None, teacher_of_domain=routes, remote={"t": foreign})
    loss, metrics = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                                temperature=1.0, logit_chunk=2 if layout == "blocks" else None,
                                micro_batch_size=1 if layout == "micro-batches" else None)
    if loss.requires_grad:  # micro-batches ran their backward already
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert metrics["xtok/aligned_token_frac"] == 1.0
    expected = _direct_loss(student, teacher, objective, prompts, completions, p_ids, c_ids, settings)
    # the learner takes chunk advantages in float32 (`advantages.chunk_advantages`, as every OPD advantage), each
    # at most adv_clip: the mean is exact to adv_clip float32 roundings of the advantage and its two sums
    assert float(loss.detach()) == pytest.approx(expected, rel=0, abs=3 * settings.adv_clip * torch.finfo(torch.float32).eps)
    assert 0.0 < metrics["xtok/distribution_token_frac"] < 1.0  # " 46" is one BPE token: a chunk term there
    report = foreign.alignment_report(batch)  # what the preflight records: one-character BPE tokens and the ends
    singles = sum(b - a == 1 for c in completions for a, b in BPE(c, return_offsets_mapping=True)["offset_mapping"])
    assert report["single_token_chunks"] == singles + len(completions)
    assert report["shared_tokens"] == len(ALPHABET) + 1


def test_an_http_teacher_of_another_tokenizer_is_refused_full_distributions_at_load() -> None:
    """A served teacher returns top-k only: a full-distribution objective is refused in one line naming
    `teacher_backends` whether or not it has its own tokenizer; top-k is accepted."""
    http = {"t": {"backend": "http", "url": "http://127.0.0.1:9/v1"}}
    teachers = {"addition": {"stage": "t", "cross_tokenizer": True}}
    with pytest.raises(ValidationError, match="(?s)teacher_backends.*full distribution"):
        MOPDStage(kind="mopd", init="x", steps=1, teachers=teachers, teacher_backends=http,
                  objective="full_reverse_kl")
    stage = MOPDStage(kind="mopd", init="x", steps=1, teachers=teachers, teacher_backends=http, objective="topk",
                      topk=8)
    assert stage.cross_tokenizer == ["t"]
