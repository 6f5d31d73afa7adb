"""Teacher backends (issue 16, item 2): teachers on Ray actors score what the in-process panel scores, a killed
actor's call is retried with the same numbers, and the recipe's `teacher_backends` is checked at load (one line)
and kept out of the stage's identity."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mopd.core.errors import RecipeError
from mopd.core.schema import ActorBackend
from mopd.envs import ALPHABET
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.recipe.identity import stage_identities
from mopd.recipe.load import load_recipe
from mopd.sampling.sampler import sample
from mopd.teachers.panel import TeacherPanel
from mopd.teachers.preflight import PreflightError
from mopd.teachers.remote import MixedPanel

from .rounding import decoder_path_terms, gamma, two_path_grad_tol, two_path_logprob_tol

TINY = TinyModelConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
ROUTES = {"short": "a", "long": "b"}


def save_models(root: Path, seeds: dict[str, int], alphabet: str = ALPHABET) -> dict[str, Path]:
    """Tiny HF checkpoints (model + the character tokenizer) named by `seeds`' keys, under `root`."""
    tok = build_char_tokenizer(alphabet)
    out = {}
    for name, seed in seeds.items():
        build_tiny_model(TINY, len(tok), tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def scoring_setup(root: Path):
    """Two teachers saved to disk, the in-process panel over them, and a batch whose rows route to both (short
    prompts to "a", long ones to "b", so "b"'s rows carry no padding of "a"'s)."""
    from mopd.models.checkpoint import load_model

    dirs = save_models(root, {"student": 0, "a": 1, "b": 2})
    tok = build_char_tokenizer(ALPHABET)
    student = load_model(dirs["student"]).eval()
    prompts = ["1+2=", "rev:abcdefghijkl=", "3+4=", "sort:zyxwvutsrqp="] * 2
    batch = sample(student, tok, prompts, max_new_tokens=5, generator=torch.Generator().manual_seed(0),
                   domains=["short", "long"] * 4)
    panel = TeacherPanel(models={n: load_model(dirs[n]).eval() for n in "ab"}, teacher_of_domain=ROUTES)
    return dirs, tok, batch, panel


def assert_same_scores(panel, other, batch, *, full: bool = True) -> None:
    """Sampled-token logprobs, top-k (where a position follows a real token) and full logits agree.

    To float32 rounding of two kernel paths (tests/rounding.py): another process scores with its own thread
    count, a server each row alone. The top-k ids are compared where their order is determined: where no two of
    the top 5 logprobs are within that rounding. A teacher scoring the wrong rows or positions is off by O(0.1).
    """
    names = panel.route(batch)
    assert other.route(batch) == names
    whole = panel.full_logits(batch, names)
    tol = two_path_logprob_tol(TINY, whole)
    torch.testing.assert_close(other.sampled_logprobs(batch, names), panel.sampled_logprobs(batch, names),
                               atol=tol, rtol=0)
    T = batch.input_ids_B_T.shape[1]
    W = T - 2
    real = batch.attention_mask_B_T.bool()
    prev_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1) & real
    lp, ids, s = panel.topk(batch, names, 4, W)
    lp2, ids2, s2 = other.topk(batch, names, 4, W)
    torch.testing.assert_close(lp2[prev_real[:, -W:]], lp[prev_real[:, -W:]], atol=tol, rtol=0)
    top5 = whole[:, -W:].log_softmax(-1).topk(5, -1).values
    decided = prev_real[:, -W:] & ((top5[..., :-1] - top5[..., 1:]) > 2 * tol).all(-1)
    assert decided.sum() > 0.9 * prev_real[:, -W:].sum()
    assert torch.equal(ids2[decided], ids[decided])
    torch.testing.assert_close(s2, s, atol=tol, rtol=0)
    if full:
        torch.testing.assert_close(other.full_logits(batch, names)[prev_real], whole[prev_real], atol=tol, rtol=0)


@pytest.fixture(scope="module")
def ray_session(ray_local):
    """The session's local Ray instance (tests/conftest.py's `ray_local`: two CPUs; teacher actors here reserve
    none, so they never wait for the stages' CPUs)."""
    return ray_local


@pytest.fixture(scope="module")
def actor_setup(tmp_path_factory, ray_session):
    from mopd.teachers.actor import start_actors

    dirs, tok, batch, panel = scoring_setup(tmp_path_factory.mktemp("actors"))
    backend = ActorBackend(backend="actor", resources={"cpus": 0.0})
    actors = start_actors("s", {n: str(dirs[n]) for n in "ab"}, {"a": backend, "b": backend}, torch.float32, None)
    return dirs, batch, panel, actors


def test_actor_teachers_score_what_the_in_process_panel_scores(actor_setup):
    _, batch, panel, actors = actor_setup
    assert_same_scores(panel, MixedPanel(local=None, remote=actors, teacher_of_domain=ROUTES), batch)


def test_one_actor_teacher_beside_an_in_process_one(actor_setup):
    """The recipe chooses per teacher: "a" in this process, "b" on its actor; the rows are routed and merged."""
    _, batch, panel, actors = actor_setup
    local = TeacherPanel(models={"a": panel.models["a"]}, teacher_of_domain=ROUTES)
    assert_same_scores(panel, MixedPanel(local=local, remote={"b": actors["b"]}, teacher_of_domain=ROUTES), batch)


def test_a_killed_actor_is_restarted_and_its_call_retried(actor_setup, ray_session):
    """The worker of teacher "a" dies (before a call, and while one is in flight): Ray restarts the actor, which
    reloads its checkpoint, retries the call, and the scores are those of an actor that never died."""
    _, batch, panel, actors = actor_setup
    mixed = MixedPanel(local=None, remote=actors, teacher_of_domain=ROUTES)
    names = panel.route(batch)
    want = panel.sampled_logprobs(batch, names)
    tol = two_path_logprob_tol(TINY, panel.full_logits(batch, names))  # as in assert_same_scores
    ray_session.kill(actors["a"].handle, no_restart=False)
    torch.testing.assert_close(mixed.sampled_logprobs(batch, names), want, atol=tol, rtol=0)
    wait = actors["a"].sampled(batch.select(torch.tensor([0, 2, 4, 6])))
    ray_session.kill(actors["a"].handle, no_restart=False)
    torch.testing.assert_close(wait(), want[[0, 2, 4, 6]], atol=tol, rtol=0)


def _cross_panels(actor_setup):
    """The actor teachers and the in-process ones, each behind the cross-tokenizer path (the same tokenizer on both
    sides): (batch, the in-process panel, its cross-path panel, the actors' cross-path panel)."""
    from mopd.models.prompting import RAW
    from mopd.teachers.cross_tokenizer import CrossTokenizer, ForeignTeacher, PanelTeacher

    _, batch, panel, actors = actor_setup
    tok = build_char_tokenizer(ALPHABET)
    cross = CrossTokenizer(tok, tok, RAW)
    here = MixedPanel(local=None, remote={n: ForeignTeacher(PanelTeacher(panel, n), cross) for n in "ab"},
                      teacher_of_domain=ROUTES)
    there = MixedPanel(local=None, remote={n: ForeignTeacher(actors[n], cross) for n in "ab"},
                       teacher_of_domain=ROUTES)
    return batch, panel, here, there


def test_an_actor_teacher_of_another_tokenizer_scores_what_it_scores_in_process(actor_setup):
    """A cross-tokenizer teacher (`teachers.cross_tokenizer.ForeignTeacher`) on its Ray actor: the actor scores the
    re-read rows in the teacher's tokens, and the chunk sums equal the in-process teacher's to float32 rounding of
    two kernel paths (one token per chunk here: the same tokenizer on both sides)."""
    batch, panel, here, there = _cross_panels(actor_setup)
    names = panel.route(batch)
    tol = two_path_logprob_tol(TINY, panel.full_logits(batch, names))
    torch.testing.assert_close(there.sampled_logprobs(batch, names), here.sampled_logprobs(batch, names),
                               atol=tol, rtol=0)
    torch.testing.assert_close(here.sampled_logprobs(batch, names), panel.sampled_logprobs(batch, names).float(),
                               atol=tol, rtol=0)
    assert torch.equal(there.chunk_ids(batch, names), here.chunk_ids(batch, names))


def test_an_actor_teacher_of_another_tokenizer_answers_distributions_as_in_process(actor_setup):
    """The distribution-level answers of a cross-tokenizer teacher on its Ray actor (`teachers.shared_support`):
    its logits at the single-token chunks in the student's vocabulary, -inf at the same places, and its top-k,
    as the in-process teacher gives them (the same tokenizer on both sides: every completion position has a term),
    to the two kernel paths' rounding (each logit within half of the logprob bound)."""
    batch, panel, here, there = _cross_panels(actor_setup)
    names = panel.route(batch)
    K = batch.input_ids_B_T.shape[1] - batch.first_completion_column + 1
    tol = two_path_logprob_tol(TINY, panel.full_logits(batch, names))
    a, b = there.logit_blocks(batch, names, K)(0, K), here.logit_blocks(batch, names, K)(0, K)
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite)
    torch.testing.assert_close(a[finite], b[finite], atol=tol, rtol=0)
    live = batch.completion_mask_B_T[:, -(K - 1):] > 0  # what position j < K - 1 predicts is a completion token
    assert torch.equal(finite[:, : K - 1].all(-1), live)
    (lp_a, ids_a, s_a), (lp_b, ids_b, s_b) = there.topk(batch, names, 4, K - 1), here.topk(batch, names, 4, K - 1)
    assert torch.equal(ids_a[live], ids_b[live]) and torch.equal(torch.isinf(lp_a), torch.isinf(lp_b))
    torch.testing.assert_close(lp_a[live], lp_b[live], atol=tol, rtol=0)
    torch.testing.assert_close(s_a, s_b, atol=tol, rtol=0)


def test_teachers_that_share_a_checkpoint_share_one_actor(actor_setup):
    from mopd.teachers.actor import start_actors

    dirs = actor_setup[0]
    backend = ActorBackend(backend="actor", resources={"cpus": 0.0})
    same = start_actors("s", {"a": str(dirs["a"]), "a_again": str(dirs["a"])}, {"a": backend, "a_again": backend},
                        torch.float32, None)
    assert same["a"].handle == same["a_again"].handle


def test_more_gpus_than_the_cluster_has_is_one_line(actor_setup):
    from mopd.teachers.actor import start_actors

    dirs = actor_setup[0]
    big = ActorBackend(backend="actor", resources={"gpus": 64.0})
    with pytest.raises(PreflightError, match=r"^stage 's': teacher 'a' asks for 1 CPUs and 64 GPUs; the Ray "
                                             r"cluster has \d+ CPUs and 0 GPUs$"):
        start_actors("s", {"a": str(dirs["a"])}, {"a": big}, torch.float32, None)


def test_without_ray_an_actor_teacher_names_the_extra(monkeypatch):
    from mopd.teachers.actor import start_actors

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(PreflightError, match=r"^stage 's': teacher 't' has `backend: actor`, which needs Ray: "
                                             r"pip install 'mopd\[ray\]'$"):
        start_actors("s", {"t": "x"}, {"t": ActorBackend(backend="actor")}, None, None)


RECIPE = """\
name: backends
seed: 0
domains: [addition, reversal]
eval: {{size: 4, max_new_tokens: 6}}
stages:
  student:
    kind: mopd
    init: {root}/student
    teachers: {{addition: {root}/a, reversal: {root}/b}}
    steps: 2
    batch_size: 4
    max_new_tokens: 6
    preflight: {{prompts: 2}}
{extra}"""


def _recipe(tmp_path: Path, extra: str = "") -> Path:
    if not (tmp_path / "student").exists():
        save_models(tmp_path, {"student": 0, "a": 1, "b": 2})
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(root=tmp_path, extra=extra))
    return path


def test_where_a_teacher_scores_is_not_the_stage_identity(tmp_path):
    plain = stage_identities(load_recipe(_recipe(tmp_path)))
    hosted = stage_identities(load_recipe(_recipe(
        tmp_path, f"    teacher_backends: {{{tmp_path}/a: {{backend: actor}}, "
                  f"{tmp_path}/b: {{backend: http, url: 'http://127.0.0.1:9/v1'}}}}\n")))
    assert plain == hosted


@pytest.mark.parametrize(("extra", "error"), [
    ("    objective: jsd\n    teacher_backends: {{{root}/a: {{backend: http, url: 'http://h:1/v1'}}}}\n",
     r"teacher '.*/a' is served over HTTP, which returns at most top-20 logprobs per position \(vLLM's "
     r"prompt_logprobs\), not the full distribution that objective 'jsd' reads"),
    ("    objective: topk\n    topk: 32\n    teacher_backends: {{{root}/a: {{backend: http, url: 'http://h:1/v1'}}}}\n",
     r"objective topk with topk 32 asks teacher '.*/a' for more logprobs per position than its server returns "
     r"\(max_logprobs 20"),
    ("    teacher_backends: {{nobody: {{backend: actor}}}}\n",
     r"teacher_backends: 'nobody' is no teacher of this stage"),
    ("    teacher_backends: {{{root}/a: {{backend: http, url: 'localhost:8000'}}}}\n", r"url"),
    ("    teacher_backends: {{{root}/a: {{backend: grpc}}}}\n", r"backend"),
], ids=["http-full-distribution", "http-topk-above-max", "not-a-teacher", "url-without-scheme", "unknown-backend"])
def test_backend_mistakes_are_one_line_at_load(tmp_path, extra, error):
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, extra.format(root=tmp_path)))
    [line] = str(err.value).splitlines()
    assert line.startswith(str(tmp_path / "r.yaml")), line
    assert __import__("re").search(error, line), line


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]  # wall-clock seconds of the step


def test_a_run_with_actor_teachers_and_a_killed_actor_has_the_in_process_numbers(tmp_path, ray_session,
                                                                                 monkeypatch):
    """The same MOPD stage with in-process teachers, and with both teachers on actors where teacher a's actor is
    killed as the second step scores: the same metrics, step for step, and the same final weights, byte for byte.

    Exact equality is sound on any CPU here because the two runs make the same computations: both at one torch
    thread (the actors' count at `cpus: 0`), and an actor's panel scores its teacher's rows as the in-process
    panel does (the same rows minus the same all-padding columns, the same window: the same kernels on the same
    shapes); everything else runs in this process. A difference would be a difference in what is computed."""
    from mopd.execution.runner import run_recipe

    extra = (f"    teacher_backends: {{{tmp_path}/a: {{backend: actor, resources: {{cpus: 0}}}}, "
             f"{tmp_path}/b: {{backend: actor, resources: {{cpus: 0}}}}}}\n")
    calls = []
    original = MixedPanel.sampled_logprobs

    def kill_on_second_step(self, batch, names_B):
        calls.append(1)
        if len(calls) == 2:
            ray_session.kill(self.remote[f"{tmp_path}/a"].handle, no_restart=False)
        return original(self, batch, names_B)

    monkeypatch.setattr(MixedPanel, "sampled_logprobs", kill_on_second_step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_recipe(load_recipe(_recipe(tmp_path)), tmp_path / "local")
        run_recipe(load_recipe(_recipe(tmp_path, extra)), tmp_path / "actors")
    finally:
        torch.set_num_threads(threads)
    assert len(calls) >= 2
    assert _metrics(tmp_path / "actors") == _metrics(tmp_path / "local")
    weights = [(tmp_path / run / "student" / "final" / "model.safetensors").read_bytes() for run in ("local", "actors")]
    assert weights[0] == weights[1]
    pre = json.loads((tmp_path / "actors" / "student" / "preflight.json").read_text())
    assert pre["remote_teachers"] == {f"{tmp_path}/a": "actor", f"{tmp_path}/b": "actor"}
    for t in "ab":  # remote teachers get the sampled-token estimate of the initial reverse KL
        entry = pre["teachers"][f"{tmp_path}/{t}"]
        assert entry["estimate"] == "sampled-token" and entry["tokens"] > 0 and math.isfinite(entry["reverse_kl"])


@pytest.mark.parametrize("objective", ["topk", "full_reverse_kl"])
def test_a_step_with_actor_teachers_has_the_in_process_loss_and_gradient(actor_setup, objective):
    """The objectives that read the teachers' top-k or full distributions through actors: the same loss and
    student gradient as with the in-process panel."""
    from mopd.core.schema import MOPDStage
    from mopd.learner.objective_table import PolicyConfig
    from mopd.learner.policy import policy_loss
    from mopd.models.checkpoint import load_model

    dirs, batch, panel, actors = actor_setup
    batch = batch.with_rewards(torch.zeros(batch.size))
    settings = MOPDStage(kind="mopd", init="x", steps=1, teachers={"short": "a", "long": "b"}, max_new_tokens=5,
                         objective=objective, topk=4)
    student = load_model(dirs["student"])
    results = []
    for scorer in (panel, MixedPanel(local=None, remote=actors, teacher_of_domain=ROUTES)):
        loss, _ = policy_loss(student, batch, PolicyConfig(sampling=settings, distill=settings, teachers=scorer),
                              temperature=1.0)
        results.append((loss, torch.autograd.grad(loss, list(student.parameters()))))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert float(loss_a.detach()) != 0 and any(float(g.abs().max()) > 0 for g in grads_a)
    # The teachers' scores differ by float32 rounding of two kernel paths (the actor's thread count); through the
    # loss they move each token's term and gradient as rounding of one more path would (tests/rounding.py: the
    # student's window of T positions, its completion tokens). Top-k ids could only differ at a near-tie of the
    # teacher's 4th and 5th logprobs, of which there is none here (checked).
    names = panel.route(batch)
    whole = panel.full_logits(batch, names)
    T, V, tokens = whole.shape[1], whole.shape[-1], int(batch.completion_mask_B_T.sum())
    top5 = whole.log_softmax(-1).topk(5, -1).values
    live = batch.completion_mask_B_T > 0
    assert bool(((top5[..., :-1] - top5[..., 1:])[live] > 2 * two_path_logprob_tol(TINY, whole)).all())
    grads = dict(zip(map(str, range(len(grads_a))), grads_a, strict=True))
    torch.testing.assert_close(loss_b, loss_a, atol=2 * gamma(decoder_path_terms(TINY, T, V) + tokens) * 10, rtol=0)
    tol = two_path_grad_tol(TINY, T, V, tokens, grads)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=0)


def test_without_ray_an_actor_teacher_is_refused_at_load(tmp_path, monkeypatch):
    """Before any stage runs (a MOPD stage may come after hours of others): one line naming the extra."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RecipeError) as err:
        load_recipe(_recipe(tmp_path, f"    teacher_backends: {{{tmp_path}/a: {{backend: actor}}}}\n"))
    [line] = str(err.value).splitlines()
    assert line.endswith(f"teacher '{tmp_path}/a' has `backend: actor`, which needs Ray (import ray: "
                         "ModuleNotFoundError: import of ray halted; None in sys.modules): pip install 'mopd[ray]'")


def test_the_sampled_reverse_kl_estimate_is_the_mean_log_ratio_of_the_sampled_tokens(tmp_path):
    """The preflight's estimate for a remote teacher: 0 for the student itself, and exactly c for a teacher whose
    every sampled-token logprob is the student's minus c (the mean of log pi_S(y_t) - log pi_T(y_t))."""
    from mopd.core.logprobs import token_logprobs
    from mopd.models.checkpoint import load_model
    from mopd.models.forward import sequence_logits
    from mopd.teachers.preflight import RolloutSettings, sampled_reverse_kl

    student = load_model(save_models(tmp_path, {"s": 0})["s"]).eval()
    tok = build_char_tokenizer(ALPHABET)
    settings = RolloutSettings(prompts=4, max_new_tokens=5, temperature=1.0, top_p=1.0)

    def shifted(c):
        def score(batch):
            lp = token_logprobs(sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T),
                                batch.input_ids_B_T)
            return (lp - c) * batch.completion_mask_B_T
        return score

    prompts = ["1+2=", "rev:abc=", "3+4=", "sort:cba="]
    for c in (0.0, 0.25):
        kl, tokens, _ = sampled_reverse_kl(student, shifted(c), tok, prompts, settings, torch.Generator().manual_seed(0))
        assert tokens > 0 and kl == pytest.approx(c, abs=1e-6)
