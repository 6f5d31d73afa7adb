"""An HTTP teacher with its own tokenizer (issue 37, item 4): a character model served as vLLM would serve it
(tests/fake_servers.py), scoring a BPE student's rows as a cross-tokenizer teacher, gives the in-process
cross-tokenizer teacher's chunk scores to float32 rounding; the same server without the opt-in, or a server whose
tokenizer is not the teacher checkpoint's, is refused when the panel connects, in one line."""

from __future__ import annotations

import pytest
import torch

from mopd.core.schema import HttpBackend
from mopd.envs import ALPHABET
from mopd.models.forward import sequence_logits
from mopd.models.prompting import RAW
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.sampler import sample
from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher, teacher_view
from mopd.teachers.http import connect_all
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.preflight import PreflightError
from mopd.teachers.remote import MixedPanel

from .fake_servers import fake_server
from .rounding import gamma, two_path_logprob_tol
from .xtok_setup import TINY, bpe_tokenizer

CHAR = build_char_tokenizer(ALPHABET)
BPE = bpe_tokenizer()
ROUTES = {"reversal": "x", "sorting": "x"}


@pytest.fixture(scope="module")
def setup():
    """A BPE student's rows (untrained: varied text, about half of its tokens merges of several characters) and a
    teacher of characters."""
    teacher = build_tiny_model(TINY, len(CHAR), CHAR, seed=1).eval().requires_grad_(False)
    student = build_tiny_model(TINY, len(BPE), BPE, seed=0).eval()
    prompts = ["rev:abcdef=", "sort:qwerty=", "rev:xyz=", "sort:hello="]
    batch = sample(student, BPE, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0),
                   domains=["reversal", "sorting"] * 2)
    return teacher, batch


def test_a_served_teacher_of_its_own_tokenizer_scores_what_the_in_process_one_does(setup):
    """Through `connect_all` with the teacher's tokenizer, the server is sent the teacher's token ids of each row
    (its own reading of the prompt and completion), and its chunk scores on the student's columns are those of the
    same teacher in process.

    Tolerance: the server scores each row alone, the panel a padded batch: a teacher token's logprob may differ by
    `two_path_logprob_tol` (tests/rounding.py) between the two; a chunk sums n of them (n the most teacher tokens in
    a chunk), each side in float32 (gamma(n) of the sum of their magnitudes). The JSON carries each float32 value
    exactly (a Python float). A token of the wrong row or position is off by O(0.1 - 1)."""
    teacher, batch = setup
    cross = CrossTokenizer(BPE, CHAR, RAW)
    names = ["x"] * batch.size
    local = MixedPanel(local=None, teacher_of_domain=ROUTES, remote={
        "x": ForeignTeacher(PanelTeacher(TeacherPanel(models={"x": teacher}, teacher_of_domain=ROUTES), "x"), cross)})
    with fake_server(teacher, CHAR, "vllm") as (root, seen):
        remote = connect_all("s", {"x": HttpBackend(backend="http", url=root + "/v1")}, BPE, {"x": CHAR})
        served = MixedPanel(local=None, remote={"x": ForeignTeacher(remote["x"], cross)}, teacher_of_domain=ROUTES)
        checks = len(seen)  # /tokenize and the order check's requests
        got = served.sampled_logprobs(batch, names)
        scored = [p for r in seen[checks:] for p in r["prompt"]]
    want = local.sampled_logprobs(batch, names)
    view = teacher_view(cross, batch)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(view.batch.input_ids_B_T, view.batch.attention_mask_B_T,
                                                            strict=True)]
    assert sorted(scored) == sorted(rows)  # the teacher's own token ids, unpadded, one list per row
    assert sum(map(len, rows)) > int(batch.attention_mask_B_T.sum())  # characters: more ids than the BPE's
    chunks = served.chunk_ids(batch, names)
    assert torch.equal(chunks, local.chunk_ids(batch, names))
    n = max(max(p.teacher_chunk.count(c) for c in range(p.chunks)) for p in view.plans)
    assert n > 1  # some chunk sums several teacher tokens (a merged BPE token's characters)
    with torch.no_grad():
        logits = sequence_logits(teacher, view.batch.input_ids_B_T, view.batch.attention_mask_B_T)
    tol = n * two_path_logprob_tol(TINY, logits) + 2 * gamma(n) * float(want.abs().max())
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    on_chunks = torch.zeros_like(want, dtype=torch.bool)  # scores sit on each chunk's last student column only
    for b, plan in enumerate(view.plans):
        for c in range(plan.chunks):
            on_chunks[b, view.first + max(col for col, k in plan.student_chunk.items() if k == c)] = True
    assert torch.equal(got != 0, on_chunks)


def test_the_same_server_without_the_opt_in_is_refused_in_one_line(setup):
    """Named as a teacher of the student's own tokenizer, the character server tokenizes the probe otherwise: one
    line naming the stage, teacher and URL. A server of another tokenizer than the teacher checkpoint's is refused
    the same way when it is a cross-tokenizer teacher."""
    teacher, _ = setup
    with fake_server(teacher, CHAR, "vllm") as (root, _):
        backend = {"x": HttpBackend(backend="http", url=root + "/v1")}
        with pytest.raises(PreflightError) as err:
            connect_all("s", backend, BPE)
        [line] = str(err.value).splitlines()
        assert line.startswith(f"stage 's': teacher 'x' at {root}/v1: uses a different tokenizer from the student")
        other = build_char_tokenizer(ALPHABET.replace("q", ""))
        with pytest.raises(PreflightError) as err:
            connect_all("s", backend, BPE, {"x": other})
        [line] = str(err.value).splitlines()
        assert line.startswith(f"stage 's': teacher 'x' at {root}/v1: uses a different tokenizer from its "
                               "checkpoint's tokenizer")
        # two cross-tokenizer teachers of one server share its client only if they share a tokenizer: the one
        # whose checkpoint is of another tokenizer than the server's is still checked, and refused
        with pytest.raises(PreflightError, match="^stage 's': teacher 'y' at .*its checkpoint's tokenizer"):
            connect_all("s", {**backend, "y": backend["x"]}, BPE, {"x": CHAR, "y": other})
        both = connect_all("s", {**backend, "y": backend["x"]}, BPE, {"x": CHAR, "y": build_char_tokenizer(ALPHABET)})
        assert both["x"] is both["y"]
