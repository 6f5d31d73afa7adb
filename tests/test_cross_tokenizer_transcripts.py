"""The per-turn teacher KL of a MOPD stage's transcripts (`stages.samples.teacher_kl`) with a teacher of another
tokenizer (issue 37): a chunk's teacher logprob sits on its last student token, so per token the KL is only
defined in sum over a chunk; tokens in no chunk (text the teacher cannot write, template tokens of one side) have
no teacher logprob at all and must not count as if the teacher gave them probability 1."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mopd.core.logprobs import token_logprobs
from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.prompting import RAW
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.stages.samples import teacher_kl
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher, teacher_view
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel

from .rounding import gamma, two_path_logprob_tol
from .xtok_setup import TINY, bpe_tokenizer

BPE = bpe_tokenizer()
ROUTES = {"reversal": "bpe_chars", "sorting": "upper"}


def test_a_cross_tokenizer_teachers_turn_kl_counts_each_chunk_once_and_no_token_outside_one():
    """A BPE student; teacher "bpe_chars" of characters (every text aligns: a chunk is one BPE token and its
    characters) and teacher "upper" of upper-case letters (no text aligns, only the end token). Per row, the KL
    summed over its finite tokens is the sum of its chunks' log-ratios, log pi_S(chunk) - log pi_T(chunk); a token
    in no chunk is NaN (left out of the turn's mean)."""
    chars, upper = build_char_tokenizer(ALPHABET), build_char_tokenizer("ABCDEF")
    student = build_tiny_model(TINY, len(BPE), BPE, seed=0).eval()
    models = {"bpe_chars": build_tiny_model(TINY, len(chars), chars, seed=1).eval(),
              "upper": build_tiny_model(TINY, len(upper), upper, seed=2).eval()}
    crosses = {"bpe_chars": CrossTokenizer(BPE, chars, RAW), "upper": CrossTokenizer(BPE, upper, RAW)}
    panel = MixedPanel(local=None, teacher_of_domain=ROUTES, remote={
        n: ForeignTeacher(PanelTeacher(TeacherPanel(models={n: m}, teacher_of_domain=ROUTES), n), crosses[n])
        for n, m in models.items()})
    batch = sample(student, BPE, ["rev:abcdef=", "sort:qwerty=", "rev:xyz=", "sort:hello="], max_new_tokens=8,
                   generator=torch.Generator().manual_seed(0), domains=["reversal", "sorting"] * 2)
    kl_B_T = teacher_kl(SimpleNamespace(teacher_of_domain=ROUTES), lambda step: panel)(student, batch, 0)

    names = panel.route(batch)
    chunks_B_T = panel.chunk_ids(batch, names)
    with torch.no_grad():
        logits = sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T)
        student_lp = token_logprobs(logits, batch.input_ids_B_T).float()
    tol = two_path_logprob_tol(TINY, logits)
    for b, name in enumerate(names):
        row = batch.select(torch.tensor([b]))
        view = teacher_view(crosses[name], row)
        with torch.no_grad():
            t_logits = sequence_logits(models[name], view.batch.input_ids_B_T, view.batch.attention_mask_B_T)
            t_lp = token_logprobs(t_logits, view.batch.input_ids_B_T)[0]
        t_tol = two_path_logprob_tol(TINY, t_logits)
        plan, t0 = view.plans[0], view.prompt_width
        want, bound = 0.0, 0.0
        for c in range(plan.chunks):  # log pi_S(chunk) - log pi_T(chunk), from each model's own forward
            s_lp = [float(student_lp[b, view.first + col]) for col, k in plan.student_chunk.items() if k == c]
            t_lp_c = [float(t_lp[t0 + j]) for j, k in enumerate(plan.teacher_chunk) if k == c]
            want += sum(s_lp) - sum(t_lp_c)
            bound += len(s_lp) * tol + len(t_lp_c) * t_tol + gamma(len(s_lp) + len(t_lp_c)) * sum(
                map(abs, s_lp + t_lp_c))
        finite = torch.isfinite(kl_B_T[b])
        assert torch.equal(finite, (chunks_B_T[b] >= 0) & (batch.completion_mask_B_T[b] > 0))
        # each logprob comes from another batch shape here than in `teacher_kl` (tests/rounding.py's two-path
        # bound, per token), and the sums round (gamma(n) of their magnitudes, twice: here and there); a token
        # counted wrongly moves the sum by a log-probability, O(1)
        got = float(kl_B_T[b][finite].sum())
        n = int(finite.sum())
        assert abs(got - want) <= bound + gamma(n) * float(kl_B_T[b][finite].abs().sum()), (name, got, want)
    assert {n for n in names} == {"bpe_chars", "upper"}
    assert any(p.unaligned for b, n in enumerate(names) if n == "upper"
               for p in teacher_view(crosses[n], batch.select(torch.tensor([b]))).plans)
