"""Learning over agent trajectories (issue 18, item 3): no objective takes gradient from environment tokens (and
the check fails when the mask is dropped), the teacher scores exactly the ids the student saw, SFT trains on the
model's turns of a gold trajectory only, and a rollout over tool domains plays episodes."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from mopd.core.batch import ROLE_ENV, ROLE_MODEL
from mopd.core.logprobs import token_logprobs
from mopd.core.schema import MOPDStage
from mopd.envs import ALPHABET, Problem, get_domain
from mopd.learner.objective_table import OBJECTIVES, PolicyConfig
from mopd.learner.policy import policy_loss
from mopd.learner.rollout import rollout
from mopd.learner.supervised import supervised_batch, supervised_loss
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.multi_turn import EpisodeRow, sample_episodes
from mopd.teachers.panel import TeacherPanel

from .test_agents_sampling import PROMPTS, EchoEpisode, _model, one_thread  # noqa: F401  (autouse)

TOK = build_char_tokenizer(ALPHABET)
TINY = TinyModelConfig(hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate_size=16)


def _student():
    """EOS with 10 times the output row of "=": turns end after a few tokens (see test_agents_sampling)."""
    return _model("=", scale=10.0)[0].train()


def _batch(student):
    """A multi-turn batch in groups of two rows with different rewards (so GRPO's advantages are not zero)."""
    rows = [EpisodeRow(Problem(p, "1", "echo", 1), EchoEpisode(i, 3), 24) for i, p in enumerate(PROMPTS)]
    batch, _ = sample_episodes(student, TOK, rows, generator=torch.Generator().manual_seed(0),
                               group_ids=[i // 2 for i in range(len(rows))])
    assert (batch.roles_B_T == ROLE_ENV).any(1).sum() >= 4  # most rows have observations in their window
    return batch.with_rewards(torch.tensor([0.0, 1.0, 0.3, 0.9, 1.0, 0.2]))


def _hidden_grads(model, loss_fn) -> torch.Tensor:
    """d loss / d (the decoder's final hidden states) [B, T, H]: the hidden state at t feeds only the logits at t,
    which predict token t + 1, so its gradient is zero exactly when no loss term scores token t + 1."""
    grads: list[torch.Tensor] = []

    def hook(module, args, out):
        out.last_hidden_state.register_hook(grads.append)

    handle = model.model.register_forward_hook(hook)
    try:
        loss = loss_fn()
        loss.backward()
    finally:
        handle.remove()
    assert len(grads) == 1
    return grads[0]


def _settings(objective: str) -> MOPDStage:
    return MOPDStage(kind="mopd", init="x", steps=1, teachers={"echo": "t"}, group_size=2, max_new_tokens=8,
                     objective="sampled" if objective == "grpo" else objective, alpha=0.5, topk=4)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_no_objective_takes_gradient_from_environment_tokens(objective: str) -> None:
    student = _student()
    teacher = build_tiny_model(TINY, len(TOK), TOK, 1).eval().requires_grad_(False)
    panel = TeacherPanel(models={"t": teacher}, teacher_of_domain={"echo": "t"})
    batch = _batch(student)
    settings = _settings(objective)
    cfg = PolicyConfig(sampling=settings, distill=None if objective == "grpo" else settings,
                       teachers=None if objective == "grpo" else panel)
    scores_env = (batch.roles_B_T[:, 1:] == ROLE_ENV)  # hidden state t predicts token t + 1
    scores_model = (batch.roles_B_T[:, 1:] == ROLE_MODEL)

    grad = _hidden_grads(student, lambda: policy_loss(student, batch, cfg, temperature=1.0)[0])
    norm_B_T = grad[:, :-1].abs().sum(-1)
    assert (norm_B_T[scores_env] == 0).all()
    assert (norm_B_T[scores_model] > 0).float().mean() > 0.5

    # the check can fail: with observations in the completion (loss) mask (and their logprobs recorded as if
    # sampled, so importance truncation keeps them), they get gradient
    with torch.no_grad():
        lp = token_logprobs(sequence_logits(student, batch.input_ids_B_T, batch.attention_mask_B_T),
                            batch.input_ids_B_T)
    window = (batch.roles_B_T > 0).float()
    leaky = replace(batch, completion_mask_B_T=window, sampler_logprobs_B_T=lp * window)
    student.zero_grad()
    grad = _hidden_grads(student, lambda: policy_loss(student, leaky, cfg, temperature=1.0)[0])
    assert (grad[:, :-1].abs().sum(-1)[scores_env] > 0).any()


def test_teacher_scores_the_ids_the_student_saw_observations_included() -> None:
    student = _student()
    teacher = build_tiny_model(TINY, len(TOK), TOK, 1).eval().requires_grad_(False)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    teacher.model.register_forward_hook(lambda m, a, kw, out: seen.append((kw["input_ids"], kw["attention_mask"])),
                                        with_kwargs=True)
    panel = TeacherPanel(models={"t": teacher}, teacher_of_domain={"echo": "t"})
    batch = _batch(student)
    panel.sampled_logprobs(batch, ["t"] * batch.size)
    (ids, mask), = seen
    drop = batch.input_ids_B_T.shape[1] - ids.shape[1]  # leading columns that are padding in every row
    assert torch.equal(ids, batch.input_ids_B_T[:, drop:]) and torch.equal(mask, batch.attention_mask_B_T[:, drop:])
    env = batch.roles_B_T[:, drop:] == ROLE_ENV
    assert env.any() and (mask[env] == 1).all()  # observations are attended context for the teacher


def test_sft_on_gold_trajectories_trains_model_turns_only() -> None:
    d = get_domain("tool_chain")
    problems = d.sample_train(random.Random(0), 3)
    ids, attn, target = supervised_batch(TOK, problems, loss_on_prompt=False)
    row = ids[0][attn[0] == 1].tolist()
    assert TOK.decode(row) == "<bos>" + problems[0].prompt + "".join(
        text + ("<eos>" if kind == "model" else "=") for kind, text in problems[0].meta["trajectory"])
    trained = TOK.decode([i for i, t in zip(ids[0].tolist(), target[0].tolist(), strict=True) if t])
    assert trained == "".join(text + "<eos>" for kind, text in problems[0].meta["trajectory"] if kind == "model")

    model = build_tiny_model(TINY, len(TOK), TOK, 0)
    grad = _hidden_grads(model, lambda: supervised_loss(model, TOK, problems, loss_on_prompt=False)[0])
    predicts_target = target[:, 1:] > 0
    norm_B_T = grad[:, :-1].abs().sum(-1)
    assert (norm_B_T[~predicts_target] == 0).all() and (norm_B_T[predicts_target] > 0).all()


def test_rollout_plays_episodes_for_tool_domains_beside_single_turn_ones() -> None:
    domains = {n: get_domain(n) for n in ("tool_lookup", "addition")}
    rng = random.Random(0)
    problems = [*domains["tool_lookup"].sample_train(rng, 2), *domains["addition"].sample_train(rng, 1)]
    settings = _settings("sampled")
    batch, metrics = rollout(_student(), TOK, problems, domains, settings, temperature=1.0,
                             generator=torch.Generator().manual_seed(0))
    assert batch.size == 6 and batch.roles_B_T is not None and batch.rewards_B is not None
    assert batch.group_ids_B.tolist() == [0, 0, 1, 1, 2, 2]
    assert {"episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/length",
            "episode/tool_call_rate/tool_lookup", "reward/addition", "sampling/temperature"} <= set(metrics)
    # the single-turn rows are scored by their verifier on their one turn
    for p, c, r in zip(problems[2:], batch.completions[4:], batch.rewards_B[4:].tolist(), strict=False):
        assert r == domains["addition"].verify(p, c.removesuffix("<eos>"))
