"""Teachers of another tokenizer (`teachers.cross_tokenizer`): the same tokenizer through the cross-tokenizer path
gives the same-tokenizer step exactly, and the chunk advantage of two different tokenizers is the math it says."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BatchEncoding

from mopd.core.batch import ROLE_ENV, ROLE_MODEL
from mopd.core.schema import MOPDStage
from mopd.core.token_chunks import align_tokens
from mopd.envs import ALPHABET, Problem, get_domain
from mopd.learner.advantages import chunk_advantages, opd_advantages
from mopd.learner.objective_table import PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.models.prompting import RAW
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.token_bytes import token_bytes
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher, describe, teacher_view
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.remote import MixedPanel

TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)
TOK = build_char_tokenizer(ALPHABET)
DOMAINS = {n: get_domain(n) for n in ("addition", "reversal")}
ROUTES = {"addition": "t_add", "reversal": "t_rev"}


def _models(dtype=torch.float64):
    student = build_tiny_model(TINY, len(TOK), TOK, 0).to(dtype)
    teachers = {"t_add": build_tiny_model(TINY, len(TOK), TOK, 1).to(dtype),
                "t_rev": build_tiny_model(TINY, len(TOK), TOK, 2).to(dtype)}
    for t in teachers.values():
        t.eval().requires_grad_(False)
    return student, teachers


def _settings(**kw) -> MOPDStage:
    return MOPDStage(kind="mopd", init="x", steps=1, teachers=dict(ROUTES), group_size=2, max_new_tokens=6,
                     temperature=1.0, top_p=1.0, is_mode="truncate", eps_low=0.5, eps_high=2.0, adv_clip=5.0, **kw)


def _loss_and_grads(student, batch, panel, settings):
    student.zero_grad()
    loss, metrics = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=panel),
                                temperature=settings.temperature)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}, metrics


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_same_tokenizer_through_the_cross_path_is_the_same_step_exactly(alpha: float) -> None:
    """Every chunk is one token when both sides tokenize alike: loss and every gradient are bit-identical (float64
    models), with one teacher foreign and the other in process (a mixed panel)."""
    student, teachers = _models()
    rng = random.Random(0)
    problems = [*DOMAINS["addition"].sample_train(rng, 3), *DOMAINS["reversal"].sample_train(rng, 2)]
    settings = _settings(alpha=alpha)
    batch, _ = rollout(student, TOK, problems, DOMAINS, settings, temperature=1.0,
                       generator=torch.Generator().manual_seed(3))
    native = TeacherPanel(models=teachers, teacher_of_domain=ROUTES)
    own = TeacherPanel(models={"t_rev": teachers["t_rev"]}, teacher_of_domain=ROUTES)
    cross = MixedPanel(local=TeacherPanel(models={"t_add": teachers["t_add"]}, teacher_of_domain=ROUTES),
                       remote={"t_rev": ForeignTeacher(PanelTeacher(own, "t_rev"), CrossTokenizer(TOK, TOK, RAW))},
                       teacher_of_domain=ROUTES)
    loss_a, grads_a, metrics_a = _loss_and_grads(student, batch, native, settings)
    loss_b, grads_b, metrics_b = _loss_and_grads(student, batch, cross, settings)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
    assert metrics_b["xtok/aligned_token_frac"] == 1.0
    assert metrics_a["mopd/reverse_kl"] == metrics_b["mopd/reverse_kl"]


def test_chunk_advantage_is_chunk_log_ratio_on_every_token() -> None:
    """Hand example: a chunk of two student tokens gets log pi_T(c) - (log pi_S(y1) + log pi_S(y2)) on both; a
    token in no chunk gets 0; one-token chunks reduce to `opd_advantages`."""
    student = torch.log(torch.tensor([[0.5, 0.25, 0.8, 0.9]], dtype=torch.float64))
    teacher = torch.tensor([[0.0, -1.0, -0.5, 0.0]], dtype=torch.float64)  # chunk 0's sum on its last token
    mask = torch.ones(1, 4)
    chunks = torch.tensor([[0, 0, 1, -1]])
    adv = chunk_advantages(teacher, student, mask, chunks)
    c0 = -1.0 - (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.25)))
    c1 = -0.5 - torch.log(torch.tensor(0.8))
    torch.testing.assert_close(adv, torch.tensor([[c0, c0, c1, 0.0]]), rtol=0, atol=1e-6)
    singles = torch.arange(4)[None]
    assert torch.equal(chunk_advantages(teacher, student, mask, singles), opd_advantages(teacher, student, mask)[0])


class _Pieces:
    """A tokenizer stand-in whose tokens are fixed pieces of the text (greedy longest match), to test the re-read
    row against known chunks without training a tokenizer."""

    def __init__(self, pieces: list[str], eos: int | None = None):
        self.vocab = {p: i for i, p in enumerate(pieces)}
        self.inv = dict(enumerate(pieces))
        self.eos_token_id, self.pad_token_id, self.bos_token_id = eos, eos, None
        self.all_special_ids = [] if eos is None else [eos]
        self.all_special_tokens = [self.inv[i] for i in self.all_special_ids]

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False):
        ids, i = [], 0
        while i < len(text):
            piece = max((p for p in self.vocab if text.startswith(p, i)), key=len)
            ids.append(self.vocab[piece])
            i += len(piece)
        return BatchEncoding({"input_ids": ids})

    def convert_ids_to_tokens(self, ids):
        return [self.inv[i] for i in ids]


def test_a_row_reread_in_other_tokens_maps_chunks_back_to_student_columns() -> None:
    """Student: characters; teacher: pieces "12", "3", "+", "4". The completion "123+4" then EOS has chunks
    [1,2] [3] [+] [4] [EOS]; the teacher's logprobs summed per chunk land on each chunk's last student column, and an
    observation in between is context only."""
    pieces = ["<eos>", "12", "3", "+", "4", "1", "2", "=", " "] + [c for c in ALPHABET if c not in "1234+= "]
    teacher_tok = _Pieces(pieces, eos=0)

    class _Fmt:  # the teacher's raw prompt: its tokens of the prompt text
        @staticmethod
        def token_ids(tok, prompt):
            return tok(prompt)["input_ids"]

    cross = CrossTokenizer(TOK, teacher_tok, _Fmt())  # type: ignore[arg-type]
    ids = TOK("123+4", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    plan = cross.plan("1=", ids, [ROLE_MODEL] * len(ids))
    assert plan.completion == [1, 2, 3, 4, 0]
    assert plan.student_chunk == {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert plan.teacher_chunk == [0, 1, 2, 3, 4]
    # with an observation " 3" between two model turns: its teacher tokens are context (no chunk)
    obs = TOK(" 3", add_special_tokens=False)["input_ids"]
    ids2 = TOK("12", add_special_tokens=False)["input_ids"] + obs + TOK("4", add_special_tokens=False)["input_ids"]
    roles = [ROLE_MODEL] * 2 + [ROLE_ENV] * len(obs) + [ROLE_MODEL]
    plan2 = cross.plan("1=", ids2, roles)
    assert plan2.completion == [1, 8, 2, 4] and plan2.roles == [ROLE_MODEL, ROLE_ENV, ROLE_ENV, ROLE_MODEL]
    assert plan2.teacher_chunk == [0, -1, -1, 1] and plan2.student_chunk == {0: 0, 1: 0, 4: 1}


def test_teacher_logprobs_are_summed_per_chunk_onto_student_columns() -> None:
    """`to_student` of known teacher logprobs: each chunk's sum on its last student token, 0 elsewhere."""
    pieces = ["<eos>", "ab", "c"] + [c for c in ALPHABET if c not in "abc"]
    cross = CrossTokenizer(TOK, _Pieces(pieces, eos=0), RAW)
    student, _ = _models(torch.float32)
    batch = sample(student, TOK, ["x", "yy"], max_new_tokens=4, temperature=1.0, top_p=1.0,
                   generator=torch.Generator().manual_seed(0))
    first = batch.first_completion_column
    ids = TOK("abc", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    batch.input_ids_B_T[:, first:first + 4] = torch.tensor(ids)
    batch.completion_mask_B_T[:, first:first + 4] = 1
    batch.attention_mask_B_T[:, first:first + 4] = 1
    batch = batch.columns(0, first + 4)
    view = teacher_view(cross, batch)
    T2 = view.batch.input_ids_B_T.shape[1]
    lp = torch.zeros(2, T2)
    lp[:, view.prompt_width:view.prompt_width + 3] = torch.tensor([-1.0, -2.0, -4.0])  # "ab", "c", <eos>
    out = view.to_student(lp)
    assert out[:, first:].tolist() == [[0.0, -1.0, -2.0, -4.0]] * 2
    assert view.chunk_ids()[:, first:].tolist() == [[0, 0, 1, 2]] * 2
    stats = describe([view])
    assert stats["aligned_text_frac"] == 1.0 and stats["student_tokens_per_chunk"] == {"1": 4, "2": 2}


def test_alignment_and_token_bytes_hand_cases() -> None:
    assert align_tokens([1, 1, 1, 1, 1], [2, 3]).student == [0, 0, 1, 1, 1]
    assert align_tokens([1, 0, 2, 2], [3, 1, 1]).teacher == [0, 1, 1]
    assert align_tokens([1, 2], [2]) is None  # not one text
    assert token_bytes(["Ġhello", "Ġwor", "ld"], " hello world") == [b" hello", b" wor", b"ld"]
    assert token_bytes(["▁hi", "<0x0A>"], "hi\n") == [b"hi", b"\n"]  # the dummy prefix dropped
    assert token_bytes(["é"], "é") == ["é".encode()]
    assert token_bytes(["Ã", "©"], "é") == [b"\xc3", b"\xa9"]  # byte-level: one character split in two tokens
    assert token_bytes(["ab"], "abc") is None


def test_a_tool_use_row_is_re_rendered_with_the_teachers_own_chat_template() -> None:
    """Multi-turn rows of a chat-template student: a teacher of the same tokenizer and template reads exactly the
    student's ids (prompt with the tools, each observation the template's tool message); a teacher whose template
    differs reads the same conversation in its own template, and the model turns still align one chunk a token."""
    from mopd.envs.tool_domains import GET
    from mopd.models.prompting import PromptFormat
    from mopd.sampling.multi_turn import EpisodeRow, sample_episodes

    from .test_agents_episode import CHATML
    from .test_agents_sampling import PROMPTS, ChatEchoEpisode

    tok = build_char_tokenizer(ALPHABET + "<>_[]")
    tok.chat_template = CHATML.replace("<e>", "<eos>")
    model = build_tiny_model(TINY, len(tok), tok, 0).double().eval()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[tok.eos_token_id] = 10 * head[tok.convert_tokens_to_ids("=")]
    fmt = PromptFormat(chat_template=True)
    rows = [EpisodeRow(Problem(p, "1", "echo", 1), ChatEchoEpisode(i, 3), 160, {"get": GET})
            for i, p in enumerate(PROMPTS[:4])]
    batch, stats = sample_episodes(model, tok, rows, generator=torch.Generator().manual_seed(0), prompt_format=fmt)
    assert any(s.turns >= 2 for s in stats) and len(batch.messages) == batch.size
    same = teacher_view(CrossTokenizer(tok, tok, fmt, tools={"echo": {"get": GET}}), batch)
    for b in range(batch.size):
        real = batch.input_ids_B_T[b][batch.attention_mask_B_T[b] == 1].tolist()
        seen = same.batch.input_ids_B_T[b][same.batch.attention_mask_B_T[b] == 1].tolist()
        if not stats[b].cut:  # a cut episode may end inside an observation the teacher renders whole
            assert seen == real
    model_tokens = int(batch.completion_mask_B_T.sum())
    assert sum(len(p.student_chunk) for p in same.plans) == model_tokens  # one chunk a model token

    other = build_char_tokenizer(ALPHABET + "<>_[]")
    other.chat_template = ("{% if tools %}[x]{% for t in tools %}{{ t.function.name }}{% endfor %}{% endif %}"
                           "{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>{% endfor %}"
                           "{% if add_generation_prompt %}[assistant]{% endif %}")
    view = teacher_view(CrossTokenizer(tok, other, fmt, tools={"echo": {"get": GET}}), batch)
    for b in range(batch.size):
        text = other.decode(view.batch.input_ids_B_T[b][view.batch.attention_mask_B_T[b] == 1].tolist())
        assert text.startswith(f"[x]get[user]{PROMPTS[b]}<eos>[assistant]")
        if stats[b].turns >= 2 and not stats[b].cut:
            assert f"[tool]{b}x" in text and "<s>" not in text  # the teacher's tool message, not the student's
    assert sum(len(p.student_chunk) for p in view.plans) == model_tokens
