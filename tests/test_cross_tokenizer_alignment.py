"""Property tests of the cross-tokenizer alignment (issue 37, item 4): on texts hypothesis draws from what each
student can write, for three tokenizer pairs in both directions (characters, a byte-level BPE trained on the
synthetic corpus, SmolLM2's tokenizer), plus SmolLM2 against characters of a Unicode alphabet (where a byte-level
token ends inside a character), the chunks tile the text, no byte is counted twice, every token that covers text is
in exactly one chunk, and `CrossTokenizer.plan` / `teacher_view` / `to_student` put each chunk's teacher sum on its
last student column.

The row a student writes is drawn as pieces: runs of text, the student's special tokens between them (its end
token, template tokens the teacher may lack) and observations (context, in no chunk). What the plan must give is
derived here from the pieces and each tokenizer's own reading of them, not from the plan. Texts mix random
characters with words of the synthetic corpus and the BPE's merged tokens (random characters rarely spell a merge)
and, for SmolLM2 as the student, any text, including the strings of either side's special tokens.
"""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mopd.core.batch import ROLE_ENV, ROLE_MODEL, rollout_batch
from mopd.core.token_chunks import align_tokens
from mopd.envs import ALPHABET
from mopd.models.checkpoint import load_tokenizer
from mopd.models.prompting import RAW
from mopd.models.token_bytes import token_bytes
from mopd.models.tokenizer import build_char_tokenizer
from mopd.teachers.cross_tokenizer import CrossTokenizer, describe, teacher_view

from .xtok_setup import bpe_tokenizer, synthetic_corpus

# under a second a pair; deadline None: the first examples pay for tokenizer warm-up on a shared machine;
# derandomized: the same examples on every run and machine, so a failure reproduces and the cost is known
FEW = settings(max_examples=100, deadline=None, derandomize=True, database=None)
CHAR = build_char_tokenizer(ALPHABET)
UNICODE = ALPHABET + "ABCXYZ.!?()\n\téèüößçñ€£→中文字😀🙂👍🏽"
UNICHAR = build_char_tokenizer(UNICODE)


@pytest.fixture(scope="module")
def smol_tok(smol_dir):
    return load_tokenizer(smol_dir)


# ---- the chunk walk alone, on byte lengths --------------------------------------------------------------------


def _boundaries(lengths: list[int]) -> set[int]:
    out, end = set(), 0
    for n in lengths:
        end += n
        out.add(end)
    return out


@st.composite
def two_cuttings(draw):
    """Two tokenizations of one text of `total` bytes as byte lengths, with zero-byte tokens (template tokens)
    anywhere."""
    total = draw(st.integers(0, 40))

    def cutting():
        cuts = sorted(draw(st.sets(st.integers(1, max(1, total - 1)), max_size=total)) - {total}) if total else []
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)] if total else []
        for _ in range(draw(st.integers(0, 3))):
            lengths.insert(draw(st.integers(0, len(lengths))), 0)
        return lengths

    return cutting(), cutting()


@FEW
@given(two_cuttings())
def test_chunks_end_exactly_where_both_sides_have_a_boundary(cuttings):
    """Chunk c's tokens on either side are one contiguous run whose bytes add up to the same length; the chunks'
    ends are exactly the offsets where both sides end a token (so no chunk could be cut smaller, and none
    overlaps another); zero-byte tokens are in no chunk."""
    s_len, t_len = cuttings
    a = align_tokens(s_len, t_len)
    assert a is not None
    ends = []
    for side, lengths in ((a.student, s_len), (a.teacher, t_len)):
        assert [c for c, n in zip(side, lengths, strict=True) if n == 0] == [-1] * lengths.count(0)
        covered = [c for c, n in zip(side, lengths, strict=True) if n > 0]
        assert covered == sorted(covered) and set(covered) == set(range(a.chunks))  # in order, none skipped
        end, side_ends = 0, []
        for c in range(a.chunks):
            end += sum(n for k, n in zip(side, lengths, strict=True) if k == c)
            side_ends.append(end)
        ends.append(side_ends)
    assert ends[0] == ends[1] == sorted(_boundaries(s_len) & _boundaries(t_len) - {0})
    assert align_tokens(s_len, [*t_len, 1]) is None  # not one text: refused, never a guess


# ---- rows of real tokenizers ------------------------------------------------------------------------------------

PAIRS = {  # student, teacher, what the student writes
    "char-bpe": ("char", "bpe", "alphabet"),
    "bpe-char": ("bpe", "char", "alphabet"),
    "bpe-smol": ("bpe", "smol", "alphabet"),
    "smol-bpe": ("smol", "bpe", "any"),
    "char-smol": ("char", "smol", "alphabet"),
    "smol-char": ("smol", "char", "any"),
    # both sides write multi-byte characters: SmolLM2's byte-level tokens end inside a character (an emoji is two
    # or more of them), the characters' tokens never do, so such a chunk is several bytes of one character
    "smol-unichar": ("smol", "unichar", "unicode"),
    "unichar-smol": ("unichar", "smol", "unicode"),
}
# Random characters rarely spell a merged token, so texts are also joined from the synthetic corpus's words and
# the BPE's own tokens: there chunks of several tokens on one side, or on both, are common.
_WORDS = sorted({w for t in synthetic_corpus() for w in t.replace(":", " : ").replace("=", " = ").split()})
_PIECES = st.sampled_from(sorted({*_WORDS, *ALPHABET, *(bpe_tokenizer().decode([i]) for i in range(4, 96))}))
_SPECIAL_STRINGS = st.sampled_from(["<eos>", "<pad>", "<unk>", "<|im_end|>", "<|im_start|>", "<|endoftext|>"])
TEXTS = {"alphabet": st.text(ALPHABET, max_size=24) | st.lists(_PIECES, max_size=8).map("".join),
         # any text: printable ASCII often (where the other side can follow), any code point (accents, CJK, emoji,
         # controls) sometimes
         # and the strings of either side's special tokens, which are text when a model writes them piece by piece
         "any": st.text(string.printable, max_size=24) | st.lists(_PIECES | _SPECIAL_STRINGS, max_size=8).map("".join)
         | st.text(max_size=12),
         "unicode": st.text(UNICODE, max_size=16)}


@st.composite
def rows(draw, student_tok, writes: str):
    """A completion window as (student ids, roles, model text runs): text, special tokens and observations."""
    specials = sorted(student_tok.all_special_ids)
    ids, roles = [], []
    for _ in range(draw(st.integers(1, 4))):
        # a completion starts with the model's turn (a first observation would be prompt, not completion)
        kind = draw(st.sampled_from(["text", "text", "special"] + (["observation"] if ids else [])))
        if kind == "special":
            ids.append(draw(st.sampled_from(specials)))
            roles.append(ROLE_MODEL)
            continue
        piece = student_tok(draw(TEXTS[writes]), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids += piece
        roles += [ROLE_ENV if kind == "observation" else ROLE_MODEL] * len(piece)
    if draw(st.booleans()):
        ids.append(student_tok.eos_token_id)
        roles.append(ROLE_MODEL)
    return ids, roles


def _runs(ids: list[int], roles: list[int], special: set[int]) -> list[tuple[str, list[int]]]:
    """The row as the teacher must read it, in order: ("text", columns) for each run of the student's model text
    tokens, ("special", [column]), ("observation", columns)."""
    out: list[tuple[str, list[int]]] = []
    for col, (i, r) in enumerate(zip(ids, roles, strict=True)):
        kind = "observation" if r == ROLE_ENV else "special" if i in special else "text"
        if out and out[-1][0] == kind and kind != "special":
            out[-1][1].append(col)
        else:
            out.append((kind, [col]))
    return out


def _teacher_mate(student_tok, teacher_tok, token: int) -> int | None:
    if token == student_tok.eos_token_id:
        return teacher_tok.eos_token_id
    name = student_tok.convert_ids_to_tokens(token)
    return teacher_tok.convert_tokens_to_ids(name) if name in teacher_tok.all_special_tokens else None


def check_plan(student_tok, teacher_tok, ids: list[int], roles: list[int]) -> None:
    """Every property of one row's plan, against what each tokenizer reads of the row's pieces."""
    plan = CrossTokenizer(student_tok, teacher_tok, RAW).plan("1+2=", ids, roles)
    want_completion, unpaired, text_bytes, aligned_bytes, unaligned = [], 0, 0, 0, 0
    student_bytes: dict[int, bytes] = {}  # student column -> bytes, of aligned runs
    teacher_bytes: dict[int, bytes] = {}  # teacher completion position -> bytes, of aligned runs
    for kind, cols in _runs(ids, roles, set(student_tok.all_special_ids)):
        run_ids = [ids[c] for c in cols]
        if kind == "special":
            mate = _teacher_mate(student_tok, teacher_tok, run_ids[0])
            if mate is None:
                unpaired += 1
                assert cols[0] not in plan.student_chunk  # a template token of one side only: no chunk
            else:
                chunk = plan.student_chunk[cols[0]]
                assert plan.teacher_chunk[len(want_completion)] == chunk  # its own chunk, with the mate alone
                assert [c for c in plan.student_chunk.values()].count(chunk) == plan.teacher_chunk.count(chunk) == 1
                want_completion.append(mate)
            continue
        text = student_tok.decode(run_ids, skip_special_tokens=kind == "observation",
                                  clean_up_tokenization_spaces=False)
        # text, even where it spells one of the teacher's special tokens
        t_ids = teacher_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []
        start = len(want_completion)
        want_completion += t_ids
        if kind == "observation":
            assert plan.teacher_chunk[start:len(want_completion)] == [-1] * len(t_ids)
            assert plan.roles[start:len(want_completion)] == [ROLE_ENV] * len(t_ids)
            continue
        text_bytes += len(text.encode())
        s_parts = token_bytes(student_tok.convert_ids_to_tokens(run_ids), text)
        t_parts = token_bytes(teacher_tok.convert_ids_to_tokens(t_ids), text)
        # only a teacher that cannot write the text (an unknown token in its reading) leaves it unaligned: the
        # student wrote it, and both sides' token strings then join back to it
        assert (s_parts is not None and t_parts is not None) == (teacher_tok.unk_token_id not in t_ids), text
        if s_parts is None or t_parts is None:  # left unaligned, counted
            unaligned += len(cols)
            assert not any(c in plan.student_chunk for c in cols)
            assert plan.teacher_chunk[start:len(want_completion)] == [-1] * len(t_ids)
            continue
        aligned_bytes += len(text.encode())
        student_bytes.update(zip(cols, s_parts, strict=True))
        teacher_bytes.update(zip(range(start, len(want_completion)), t_parts, strict=True))
    assert plan.completion == want_completion  # the teacher reads the row's own text, in its own tokens
    assert (plan.unpaired, plan.unaligned, plan.text_bytes, plan.aligned_bytes) == (
        unpaired, unaligned, text_bytes, aligned_bytes)
    assert plan.model_tokens == roles.count(ROLE_MODEL)
    # every token that covers aligned text is in exactly one chunk (a dict: at most one; here: at least one)
    assert {c for c, b in student_bytes.items() if b} <= set(plan.student_chunk)
    assert all(plan.teacher_chunk[j] >= 0 for j, b in teacher_bytes.items() if b)
    # chunks in order on both sides, none skipped; each chunk's student bytes are its teacher bytes
    s_order = [plan.student_chunk[c] for c in sorted(plan.student_chunk)]
    t_order = [c for c in plan.teacher_chunk if c >= 0]
    assert s_order == sorted(s_order) and t_order == sorted(t_order)
    assert set(s_order) == set(t_order) == set(range(plan.chunks))
    s_text = [b""] * plan.chunks
    t_text = [b""] * plan.chunks
    for col, b in student_bytes.items():
        if col in plan.student_chunk:
            s_text[plan.student_chunk[col]] += b
    for j, b in teacher_bytes.items():
        if plan.teacher_chunk[j] >= 0:
            t_text[plan.teacher_chunk[j]] += b
    assert s_text == t_text
    # the text chunks in order rebuild the aligned text, so no byte is counted twice (nor left out)
    assert sum(map(len, s_text)) == aligned_bytes
    assert b"".join(s_text) == b"".join(student_bytes[c] for c in sorted(student_bytes))


def check_view(student_tok, teacher_tok, rows_: list[tuple[list[int], list[int]]]) -> None:
    """`teacher_view` over a batch of the rows (right-padded, left-padded prompts of two lengths), and `to_student`
    of teacher logprobs -(j + 1) at completion position j (sums exact in float32): each chunk's sum on its last
    student column, 0 on every other column; `chunk_ids` the plan's chunk of each column; `describe` its counts."""
    cross = CrossTokenizer(student_tok, teacher_tok, RAW)
    prompts = ["1+2=", "rev:abc="][: len(rows_)]
    p_ids = [student_tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    P, N, B = max(map(len, p_ids)), max(1, max(len(i) for i, _ in rows_)), len(rows_)
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    prompt_B_P, prompt_mask = torch.full((B, P), pad), torch.zeros((B, P), dtype=torch.long)
    comp_B_N, roles_B_N = torch.full((B, N), pad), torch.zeros((B, N), dtype=torch.long)
    for b, (p, (ids, roles)) in enumerate(zip(p_ids, rows_, strict=True)):
        prompt_B_P[b, P - len(p):], prompt_mask[b, P - len(p):] = torch.tensor(p), 1
        if ids:
            comp_B_N[b, :len(ids)], roles_B_N[b, :len(ids)] = torch.tensor(ids), torch.tensor(roles)
    batch = rollout_batch(prompt_B_P, prompt_mask, comp_B_N, torch.zeros((B, N)), (roles_B_N == ROLE_MODEL).float(),
                          prompts=prompts, completions=[""] * B, completion_roles_B_N=roles_B_N)
    batch.attention_mask_B_T[:, P:] = (roles_B_N > 0).long()
    if not batch.completion_mask_B_T.any():
        return  # no model token in any row: nothing to score
    view = teacher_view(cross, batch)
    first = batch.first_completion_column
    T2 = view.batch.input_ids_B_T.shape[1]
    lp = torch.full((B, T2), -1000.0)  # prompt columns: a sum that took one would be off by 1000
    lp[:, view.prompt_width:] = -torch.arange(1, T2 - view.prompt_width + 1, dtype=torch.float32)
    out, chunk_ids = view.to_student(lp), view.chunk_ids()
    for b, plan in enumerate(view.plans):
        want = torch.zeros(batch.input_ids_B_T.shape[1])
        want_ids = torch.full_like(want, -1, dtype=torch.long)
        for col, c in plan.student_chunk.items():
            want_ids[first + col] = c
        for c in range(plan.chunks):
            last = max(col for col, k in plan.student_chunk.items() if k == c)
            want[first + last] = -sum(j + 1.0 for j, k in enumerate(plan.teacher_chunk) if k == c)
        assert torch.equal(out[b], want) and torch.equal(chunk_ids[b], want_ids)
    stats = describe([view])
    chunks = sum(p.chunks for p in view.plans)
    assert stats["chunks"] == chunks
    for side in ("student", "teacher"):
        hist = stats[f"{side}_tokens_per_chunk"]
        assert sum(hist.values()) == chunks and all(int(k) >= 1 for k in hist)
    assert sum(int(k) * v for k, v in stats["student_tokens_per_chunk"].items()) == sum(
        len(p.student_chunk) for p in view.plans)
    text = sum(p.text_bytes for p in view.plans)
    assert stats["aligned_text_frac"] == (sum(p.aligned_bytes for p in view.plans) / text if text else 1.0)


def _tok(name: str, smol):
    return {"char": CHAR, "unichar": UNICHAR, "bpe": bpe_tokenizer(), "smol": smol}[name]


def check_pair(pair: str, smol=None) -> None:
    """Per pair: the plan's properties on each drawn row, then `teacher_view` / `to_student` over a batch of those
    rows. A student whose text the teacher can write in full aligns all of it."""
    s_name, t_name, writes = PAIRS[pair]
    student_tok, teacher_tok = _tok(s_name, smol), _tok(t_name, smol)

    @FEW
    @given(st.lists(rows(student_tok, writes), min_size=1, max_size=2))
    @example([([], [])])
    def prop(drawn):
        for ids, roles in drawn:
            check_plan(student_tok, teacher_tok, ids, roles)
            if writes != "any":
                plan = CrossTokenizer(student_tok, teacher_tok, RAW).plan("", ids, roles)
                assert plan.aligned_bytes == plan.text_bytes and plan.unaligned == 0
        check_view(student_tok, teacher_tok, drawn)

    prop()


@pytest.mark.parametrize("pair", [p for p, (s, t, _) in PAIRS.items() if "smol" not in (s, t)])
def test_alignment_properties_of_characters_and_the_bpe(pair):
    check_pair(pair)


@pytest.mark.parametrize("pair", [p for p, (s, t, _) in PAIRS.items() if "smol" in (s, t)])
def test_alignment_properties_with_smollm2(pair, smol_tok):
    """SmolLM2's tokenizer (`smol_dir`: converted once per test session, shared with the real-model tests)."""
    check_pair(pair, smol_tok)
