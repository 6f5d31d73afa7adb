"""Multi-turn sampling (issue 18, item 2): the cache carried across turns gives the tokens and logprobs of
recomputing every turn, the sampler's logprobs are the training forward's on model tokens, and the role mask puts
observations in the window but out of the completion (loss) mask.

The models here run in float64. The cached and the recomputing sampler (and the single-turn one) run their
forwards on different shapes, whose kernels round differently on different CPUs; in float64 their logits differ
by ~1e-16 relative, and the samplers draw from float32 roundings of them (`.float()`), which are then identical
except with probability ~2^-29 per logit (so is the deliberate tie of EOS with "=" in `_model`, which greedy
decoding breaks toward EOS). So the tokens are compared exactly, on any CPU; the logprobs to the float32 rounding
of the logits (`tests/rounding.py`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from mopd.core.batch import ROLE_ENV, ROLE_MODEL, ROLE_PROMPT
from mopd.core.logprobs import token_logprobs
from mopd.envs import ALPHABET, Problem, get_domain
from mopd.envs.episode import EpisodeStats, Reply, SingleTurnEpisode
from mopd.models.forward import sequence_logits
from mopd.models.tiny import TinyModelConfig, build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.multi_turn import EpisodeRow, episode_metrics, sample_episodes
from mopd.sampling.sampler import sample

from .rounding import sampler_logprob_tol


@pytest.fixture(autouse=True)
def one_thread():
    """Small models, many small steps: on a shared 2-core machine two torch threads wait on each other (the
    recipe-run test took 48 s with two, 3.5 s with one). Modules that import this fixture use it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(eos_like: str | None = None, scale: float = 1.0, dtype: torch.dtype = torch.float32):
    """A tiny model; with `eos_like`, EOS gets that character's output row (times `scale`), so greedy decoding
    ends a turn where it would write the character (EOS has the lower id, and argmax keeps the first of equal
    logits) and sampling ends turns often. The comparisons of two samplers here take float64 (module docstring)."""
    tok = build_char_tokenizer(ALPHABET)
    cfg = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok, seed=0).to(dtype).eval()
    if eos_like is not None:
        head = model.get_output_embeddings().weight
        with torch.no_grad():
            head[tok.eos_token_id] = scale * head[tok.convert_tokens_to_ids(eos_like)]
    return model, tok


@dataclass
class EchoEpisode:
    """Every turn but the `turns`-th gets an observation (row- and turn-dependent text); reward = turns taken."""

    row: int
    turns: int
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list = field(default_factory=list)

    def step(self, turn: str) -> Reply:
        self.stats.turns += 1
        if self.stats.turns >= self.turns:
            return Reply(None, reward=self.stats.turns / 10)
        self.messages.append({"role": "tool", "content": f"{self.row}x{turn[:3]}"})
        return Reply(self.messages[-1]["content"])

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        return 0.0


PROMPTS = ["12+3=", "rev:abcdef=", "sort:cba=", "mul:12*34=", "lookup:abc=", "7*8="]


def _echo_rows(budget: int = 28) -> list[EpisodeRow]:
    return [EpisodeRow(Problem(p, "1", "echo", 1), EchoEpisode(i, 2 + i % 3), budget) for i, p in enumerate(PROMPTS)]


def _assert_same(a, b, model) -> None:
    assert torch.equal(a.input_ids_B_T, b.input_ids_B_T)
    assert torch.equal(a.roles_B_T, b.roles_B_T)
    with torch.no_grad():  # each side's float32 logprobs are within sampler_logprob_tol of the exact ones
        logits = sequence_logits(model, a.input_ids_B_T, a.attention_mask_B_T)
    torch.testing.assert_close(a.sampler_logprobs_B_T, b.sampler_logprobs_B_T, atol=2 * sampler_logprob_tol(logits),
                               rtol=0)
    assert torch.equal(a.rewards_B, b.rewards_B)


def test_cached_turns_equal_recomputing_every_turn_greedy_and_seeded() -> None:
    for temperature in (0.0, 1.0):
        model, tok = _model("=", scale=1.0 if temperature == 0 else 10.0, dtype=torch.float64)
        gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        cached, stats = sample_episodes(model, tok, _echo_rows(), temperature=temperature, generator=gen())
        again, _ = sample_episodes(model, tok, _echo_rows(), temperature=temperature, generator=gen(), recompute=True)
        _assert_same(cached, again, model)
        assert sum(s.turns >= 2 for s in stats) >= 3  # the test exercises observations between turns
        assert (cached.roles_B_T == ROLE_ENV).sum() > 10


def test_sampler_logprobs_are_the_training_forwards_on_model_tokens_only() -> None:
    model, tok = _model("=", scale=6.0, dtype=torch.float64)
    batch, _ = sample_episodes(model, tok, _echo_rows(), generator=torch.Generator().manual_seed(1))
    roles = batch.roles_B_T
    assert torch.equal(batch.completion_mask_B_T, (roles == ROLE_MODEL).float())
    P = 1 + max(len(p) for p in PROMPTS)  # BOS + the longest prompt: the window starts there
    assert torch.equal(batch.attention_mask_B_T[:, P:], (roles[:, P:] != ROLE_PROMPT).long())
    with torch.no_grad():
        logits = sequence_logits(model, batch.input_ids_B_T, batch.attention_mask_B_T)
    lp = token_logprobs(logits, batch.input_ids_B_T)
    # float64 logprobs of the training forward against the sampler's float32 ones (tests/rounding.py); a logprob
    # of another position or of an observation token is off by O(0.1)
    torch.testing.assert_close(lp * batch.completion_mask_B_T, batch.sampler_logprobs_B_T.double(),
                               atol=sampler_logprob_tol(logits), rtol=0)
    assert (batch.sampler_logprobs_B_T[roles != ROLE_MODEL] == 0).all()
    # the observation tokens in the window are the environment's text, each followed by "="
    row = batch.input_ids_B_T[0][roles[0] == ROLE_ENV].tolist()
    assert tok.decode(row).startswith("0x") and tok.decode(row).endswith("=")
    assert batch.select(torch.tensor([1, 0])).roles_B_T[1].tolist() == roles[0].tolist()


def test_single_turn_rows_reproduce_the_single_turn_sampler() -> None:
    model, tok = _model(dtype=torch.float64)
    for temperature in (0.0, 1.0):
        d = get_domain("addition")
        problems = d.eval_set(6)
        rows = [EpisodeRow(p, SingleTurnEpisode(p, d.verify), 8) for p in problems]
        multi, _ = sample_episodes(model, tok, rows, temperature=temperature,
                                   generator=torch.Generator().manual_seed(2))
        single = sample(model, tok, [p.prompt for p in problems], max_new_tokens=8, temperature=temperature,
                        generator=torch.Generator().manual_seed(2))
        assert torch.equal(multi.input_ids_B_T, single.input_ids_B_T)
        assert torch.equal(multi.completion_mask_B_T, single.completion_mask_B_T)
        with torch.no_grad():
            logits = sequence_logits(model, single.input_ids_B_T, single.attention_mask_B_T)
        torch.testing.assert_close(multi.sampler_logprobs_B_T, single.sampler_logprobs_B_T,
                                   atol=2 * sampler_logprob_tol(logits), rtol=0)
        expected = [d.verify(p, c) for p, c in zip(problems, single.completions, strict=True)]
        assert multi.rewards_B.tolist() == expected


def test_token_budget_cuts_a_tool_episode_with_reward_zero_and_metrics() -> None:
    model, tok = _model()
    d = get_domain("tool_lookup")
    problems = d.sample_train(random.Random(0), 4)
    rows = [EpisodeRow(p, d.start(p), 6, d.tools) for p in problems]
    batch, stats = sample_episodes(model, tok, rows, temperature=0.0)
    assert batch.input_ids_B_T.shape[1] - batch.roles_B_T.eq(ROLE_PROMPT).all(0).sum() <= 6
    assert all(s.cut for s in stats) and batch.rewards_B.tolist() == [0.0] * 4
    m = episode_metrics(stats, batch.domains)
    assert m["episode/cut_rate"] == 1.0 and m["episode/length"] == 6.0 and m["episode/tool_call_rate"] == 0.0


@dataclass
class ChatEchoEpisode(EchoEpisode):
    """EchoEpisode keeping the chat a template renders: user, then assistant and tool messages per turn."""

    def __post_init__(self) -> None:
        self.messages.append({"role": "user", "content": PROMPTS[self.row]})

    def step(self, turn: str) -> Reply:
        self.messages.append({"role": "assistant", "content": turn})
        return super().step(turn)


def test_chat_template_episodes_append_the_templates_tool_turns() -> None:
    """Through a chat template (the ChatML-like one of test_agents_episode, on the character tokenizer): the prompt
    carries the tools, each observation is the template's tool message and next generation prompt, and the cache
    carried across turns still gives the recomputed tokens."""
    from mopd.envs.tool_domains import GET
    from mopd.models.prompting import PromptFormat

    from .test_agents_episode import CHATML

    tok = build_char_tokenizer(ALPHABET + "<>_")
    tok.chat_template = CHATML.replace("<e>", "<eos>")
    cfg = TinyModelConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok, seed=0).double().eval()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[tok.eos_token_id] = 10 * head[tok.convert_tokens_to_ids("=")]
    fmt = PromptFormat(chat_template=True)

    def rows():
        return [EpisodeRow(Problem(p, "1", "echo", 1), ChatEchoEpisode(i, 3), 160, {"get": GET})
                for i, p in enumerate(PROMPTS[:4])]

    cached, stats = sample_episodes(model, tok, rows(), generator=torch.Generator().manual_seed(0), prompt_format=fmt)
    again, _ = sample_episodes(model, tok, rows(), generator=torch.Generator().manual_seed(0), prompt_format=fmt,
                               recompute=True)
    _assert_same(cached, again, model)
    assert any(s.turns >= 2 for s in stats)
    checked = 0
    for b in range(cached.size):
        roles, ids = cached.roles_B_T[b], cached.input_ids_B_T[b]
        text = tok.decode(ids[cached.attention_mask_B_T[b] == 1].tolist())
        assert text.startswith(f"<s>tools:get <s>user:{PROMPTS[b]}<eos><s>assistant:")
        runs, prev = [], ROLE_PROMPT  # each observation's ids (a maximal run of environment tokens)
        for tid, role in zip(ids.tolist(), roles.tolist(), strict=True):
            if role == ROLE_ENV:
                runs.append([tid]) if prev != ROLE_ENV else runs[-1].append(tid)
            prev = role
        complete = runs[:-1] if stats[b].cut else runs  # a cut episode may end inside its last observation
        for run in complete:  # the template's tool message, then the next assistant turn's opening
            assert tok.decode(run).startswith(f"<s>tool:{b}x") and tok.decode(run).endswith("<eos><s>assistant:")
        checked += len(complete)
    assert checked >= 2
