"""Does a slow tool stall decoding of the other rows? A rollout's time with a 200 ms tool called by 1 and by 8 rows.

    .venv/bin/python benchmarks/tool_latency.py [--batch 8] [--tool-ms 200] [--turns 4] [--budget 64] [--reps 3]

Each of `--batch` episodes calls a tool after every turn but the last (`--turns - 1` calls); in the "1 slow" runs
one row's tool sleeps `--tool-ms` and the others' answer at once, in the "all slow" runs every row's tool sleeps.
Rows end their turns at different steps (an untrained model whose EOS is given `--eos-scale` times the output row
of "=", so turns end after a few tokens), so their calls rarely start at the same step. Three ways of running the
tools, on the same rows, model and seed:

* inline: the tool runs inside the decode loop, one call after another (what mopd did before issue 38: an
  episode with only `step`);
* wait: the calls of a step start together and the batch waits for them after its next forward (the default);
* overlap: `Limits.overlap_tools`; a row whose tool runs holds while the others decode.

The time is `sample_episodes` for the whole batch (the rollout part of a training step), median of `--reps`,
the three ways interleaved. With the tools instant the three take the decoding time alone (reported as
`no_wait_s`). The tools are the same calls through `envs.tool_runner.start_calls` as a `ToolEpisode`'s.
Writes benchmarks/tool_latency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common
import torch

from mopd.envs import Problem, tool
from mopd.envs.episode import EpisodeStats, PendingReply, Reply
from mopd.envs.tool_runner import start_calls
from mopd.envs.tools import ToolCall
from mopd.models.tiny import build_tiny_model
from mopd.models.tokenizer import build_char_tokenizer
from mopd.sampling.multi_turn import EpisodeRow, sample_episodes

OUT = Path(__file__).resolve().parent / "tool_latency.json"


def _sleep_then(seconds: float, text: str) -> str:
    """Sleep, then answer."""
    time.sleep(seconds)
    return text


SLEEP = tool(_sleep_then, name="sleep")


@dataclass
class SlowToolEpisode:
    """Calls the tool after every turn but the last; `inline` runs it in `step` (no `submit`: the old way)."""

    turns: int
    delay_s: float
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list = field(default_factory=list)

    def submit(self, turn: str) -> PendingReply:
        self.stats.turns += 1
        if self.stats.turns >= self.turns:
            return PendingReply.now(Reply(None, reward=1.0))
        pending = start_calls([ToolCall(SLEEP, {"seconds": self.delay_s, "text": f"{self.stats.turns:02d}7777"})],
                              None, time_limit_s=self.delay_s + 5.0, max_chars=16)

        def finish() -> Reply:
            self.stats.tool_calls += 1
            self.messages.append({"role": "tool", "content": pending.results()[0].text})
            return Reply(self.messages[-1]["content"])

        return PendingReply(finish, pending.done)

    def cut(self, partial: str) -> float:
        self.stats.cut = True
        return 0.0


@dataclass
class InlineEpisode(SlowToolEpisode):
    def step(self, turn: str) -> Reply:
        return SlowToolEpisode.submit(self, turn).reply()

    submit = None  # type: ignore[assignment]  (no submit: `submit_turn` runs `step` in the decode loop)


def rows(n: int, turns: int, budget: int, slow: int, delay_s: float, inline: bool) -> list[EpisodeRow]:
    kind = InlineEpisode if inline else SlowToolEpisode
    return [EpisodeRow(Problem(p.prompt, p.answer, "bench", 1), kind(turns, delay_s if i < slow else 0.0), budget)
            for i, p in enumerate(_common.problems(n))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tool-ms", type=float, default=200.0)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eos-scale", type=float, default=5.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer(_common.ALPHABET)
    model = build_tiny_model(_common.STUDENT, len(tok), tok, seed=0).eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = args.eos_scale * head[tok.convert_tokens_to_ids("=")]
    delay = args.tool_ms / 1000

    def once(mode: str, slow: int, delay_s: float = delay):
        return sample_episodes(model, tok, rows(args.batch, args.turns, args.budget, slow, delay_s, mode == "inline"),
                               temperature=1.0, generator=torch.Generator().manual_seed(0),
                               overlap_tools=mode == "overlap")

    modes = ("inline", "wait", "overlap")
    once("wait", 0)  # warm-up
    no_wait = {m: [] for m in modes}
    times: dict[str, dict[str, list[float]]] = {s: {m: [] for m in modes} for s in ("1 slow", "all slow")}
    for _ in range(args.reps):  # interleaved, so a change in the machine's load hits every mode
        for m in modes:
            no_wait[m].append(_common.timed(lambda m=m: once(m, 0)))
            times["1 slow"][m].append(_common.timed(lambda m=m: once(m, 1)))
            times["all slow"][m].append(_common.timed(lambda m=m: once(m, args.batch)))
    _, stats = once("wait", 0)
    results = {
        "machine": _common.machine(), "threads": args.threads, "batch": args.batch, "tool_ms": args.tool_ms,
        "turns": args.turns, "budget": args.budget, "reps": args.reps,
        "calls_per_slow_row": sum(s.tool_calls for s in stats) / len(stats),
        "no_wait_s": {m: _common.median(v) for m, v in no_wait.items()},
        "step_s": {s: {m: _common.median(v) for m, v in by.items()} for s, by in times.items()},
    }
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)


if __name__ == "__main__":
    main()
