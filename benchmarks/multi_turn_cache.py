"""Multi-turn sampling with the KV cache carried across turns against recomputing the prefix at each turn.

    .venv/bin/python benchmarks/multi_turn_cache.py [--batch 16] [--budget 96] [--turns 5] [--reps 3] [--threads 1] [--model student]

Both runs are `sampling.multi_turn.sample_episodes` on the same rows and seed: cached feeds each observation token
through the cached decode step; `recompute=True` rebuilds the cache from the whole prefix (prompt, earlier turns,
observations) whenever a row starts a new turn, what a loop of single-turn generate calls over the growing
transcript does. The tokens must be identical (checked). Batch 1 is the plain per-episode comparison; in a batch,
the baseline re-reads every row's prefix when any row starts a turn (rows' turns do not line up).

The model is the benchmarks' 0.79M-parameter student, or with `--model teacher` the 2.77M one (untrained; EOS given `--eos-scale` times the output row of
"=", so turns end after a few tokens, as a trained agent's do); each episode answers `--turns - 1` turns with a
12-character observation, then ends. Writes benchmarks/multi_turn_cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import _common
import torch

from mopd.envs import Problem
from mopd.envs.episode import EpisodeStats, Reply
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.multi_turn import EpisodeRow, sample_episodes

OUT = Path(__file__).resolve().parent / "multi_turn_cache.json"


@dataclass
class ToolLikeEpisode:
    """Answers every turn but the last with a 12-character observation (what a tool returns), then ends."""

    turns: int
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list = field(default_factory=list)

    def step(self, turn: str) -> Reply:
        self.stats.turns += 1
        if self.stats.turns >= self.turns:
            return Reply(None, reward=1.0)
        self.messages.append({"role": "tool", "content": f"{self.stats.turns:02d}" + "7" * 10})
        return Reply(self.messages[-1]["content"])

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        return 0.0


def rows(n: int, turns: int, budget: int) -> list[EpisodeRow]:
    problems = _common.problems(n)
    return [EpisodeRow(Problem(p.prompt, p.answer, "bench", 1), ToolLikeEpisode(turns), budget) for p in problems]


def run(batch: int, turns: int, budget: int, reps: int, eos_scale: float, shape: str) -> dict[str, float]:
    tok = build_char_tokenizer(_common.ALPHABET)
    model = build_tiny_model(getattr(_common, shape.upper()), len(tok), tok, seed=0).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = eos_scale * head[tok.convert_tokens_to_ids("=")]

    def once(recompute: bool):
        return sample_episodes(model, tok, rows(batch, turns, budget), temperature=1.0,
                               generator=torch.Generator().manual_seed(0), recompute=recompute)

    once(False)  # warm-up
    cached_s, recompute_s = [], []
    for _ in range(reps):  # interleaved, so a change in the machine's load hits both
        cached_s.append(_common.timed(lambda: once(False)))
        recompute_s.append(_common.timed(lambda: once(True)))
    a, stats = once(False)
    b, _ = once(True)
    same = torch.equal(a.input_ids_B_T, b.input_ids_B_T) and torch.allclose(
        a.sampler_logprobs_B_T, b.sampler_logprobs_B_T, atol=1e-5)
    n = len(stats)
    return {
        "batch": batch, "same_tokens": bool(same),
        "cached_s": _common.median(cached_s), "recompute_s": _common.median(recompute_s),
        "speedup": _common.median(recompute_s) / _common.median(cached_s),
        "mean_turns": sum(s.turns for s in stats) / n, "mean_episode_tokens": sum(s.tokens for s in stats) / n,
        "model_tokens_per_episode": float(a.completion_mask_B_T.sum()) / n,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", type=int, default=96)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eos-scale", type=float, default=5.0)
    ap.add_argument("--model", choices=("student", "teacher"), default="student")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"machine": _common.machine(), "threads": args.threads, "budget": args.budget, "turns": args.turns,
               "model": args.model, "eos_scale": args.eos_scale,
               "runs": [run(bs, args.turns, args.budget, args.reps, args.eos_scale, args.model)
                        for bs in (1, args.batch)]}
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
