"""Transcripts: what a model wrote, turn by turn, as JSONL a researcher reads (issue 38).

Every held-out eval writes one record per prompt, and a sampling stage with `log_samples: N` writes a few of its
rollouts every N steps, both under `<stage>/samples/` (`core.run_dir`: `eval-<step>.jsonl`,
`train-<step>.jsonl`). A record:

    {"step": 10, "kind": "eval" | "train", "domain": "tool_mul", "prompt": "mul:12*34=", "reference": "408",
     "reward": 1.0, "turns": [{"role": "assistant", "text": "<mul(12,34)>", "tool_call": true, "teacher_kl": 0.4},
                              {"role": "tool", "text": "408="}, {"role": "assistant", "text": "408", ...}]}

The turns are cut from the completion window by who wrote each token (`core.batch` roles): a run of model tokens
is an assistant turn (its EOS left out of the text), a run of observation tokens a tool turn (the tool's result as
the model saw it, the raw format's `=` cue included); an assistant turn followed by a tool turn is a `tool_call`.
`teacher_kl` (MOPD stages): the mean over the turn's tokens of log pi_student(y_t) - log pi_teacher(y_t), the
per-token reverse-KL estimate on the sampled tokens that MOPD's advantage is the negative of (a teacher of another
tokenizer: over the tokens in its aligned chunks, each chunk's log-ratio counted once; absent when none aligns).

One file per eval and per logged step, each written whole and atomically: a resumed stage that redoes a step
rewrites its file, so nothing is written twice and no half-written record is left by a kill. Files are read back
as untrusted (`read_transcripts` skips what is not a record).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..core.batch import ROLE_ENV, ROLE_MODEL, RolloutBatch
from ..core.run_dir import SAMPLES
from ..sampling.sampler import completion_text

SAMPLES_PER_DOMAIN = 2  # rollouts of each domain a training stage keeps at a logged step


def samples_path(stage_dir: Path, kind: str, step: int) -> Path:
    """Where the transcripts of one eval (`kind` "eval") or one logged training step ("train") go."""
    return Path(stage_dir) / SAMPLES / f"{kind}-{step:07d}.jsonl"


def _turns(ids: list[int], roles: list[int], kl: list[float] | None, tokenizer) -> list[dict[str, Any]]:
    """The completion window's turns: runs of model tokens and of observation tokens, in order."""
    runs: list[tuple[int, list[int], list[float]]] = []
    for t, (tok, role) in enumerate(zip(ids, roles, strict=True)):
        if role not in (ROLE_MODEL, ROLE_ENV):
            continue  # padding
        if not runs or runs[-1][0] != role:
            runs.append((role, [], []))
        runs[-1][1].append(tok)
        if kl is not None and role == ROLE_MODEL and math.isfinite(kl[t]):  # NaN: a row without a teacher
            runs[-1][2].append(kl[t])
    turns: list[dict[str, Any]] = []
    for i, (role, toks, kls) in enumerate(runs):
        if role == ROLE_ENV:
            turns.append({"role": "tool", "text": completion_text(tokenizer, toks)})
            continue
        text = completion_text(tokenizer, [x for x in toks if x != tokenizer.eos_token_id])
        turn: dict[str, Any] = {"role": "assistant", "text": text,
                                "tool_call": i + 1 < len(runs) and runs[i + 1][0] == ROLE_ENV}
        if kls:
            turn["teacher_kl"] = sum(kls) / len(kls)
        turns.append(turn)
    return turns


def transcripts(batch: RolloutBatch, tokenizer, *, step: int, kind: str, rows: Iterable[int] | None = None,
                kl_B_T: torch.Tensor | None = None, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One record per row of a rewarded batch (`rows`: some of them, in that order).

    Args:
        kl_B_T: per-token log pi_S - log pi_T, aligned to the batch's tokens (MOPD), or None.
        extra: fields every record carries (the scored model of an eval stage, ...).
    """
    start = batch.first_completion_column
    ids_B_N = batch.input_ids_B_T[:, start:].tolist()
    roles_B_N = batch.roles[:, start:].tolist()
    kl_B_N = kl_B_T[:, start:].tolist() if kl_B_T is not None else None
    rewards = batch.rewards_B.tolist() if batch.rewards_B is not None else [None] * batch.size
    out = []
    for b in range(batch.size) if rows is None else rows:
        record = {"step": step, "kind": kind, "domain": batch.domains[b] if batch.domains else "",
                  "prompt": batch.prompts[b] if batch.prompts else "",
                  "reference": batch.references[b] if batch.references else None, "reward": rewards[b],
                  "turns": _turns(ids_B_N[b], roles_B_N[b], kl_B_N[b] if kl_B_N else None, tokenizer)}
        out.append({**record, **(extra or {})})
    return out


def sampled_rows(domains: list[str], rng: random.Random, per_domain: int = SAMPLES_PER_DOMAIN) -> list[int]:
    """Up to `per_domain` rows of each domain, drawn with `rng` (its own generator: the stage's draws are left
    alone, so logging samples changes no trained number), in row order."""
    chosen: list[int] = []
    for d in sorted(set(domains)):
        mine = [i for i, x in enumerate(domains) if x == d]
        chosen += rng.sample(mine, min(per_domain, len(mine)))
    return sorted(chosen)


def write_transcripts(path: Path, records: list[dict[str, Any]]) -> None:
    """The file whole, atomically (temp file beside it, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_transcripts(path: Path) -> list[dict[str, Any]]:
    """The records of one file; a line that is not a JSON object with a list of turns is skipped (a run directory
    is untrusted input), and an unreadable file reads as none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("turns"), list):
            out.append(record)
    return out


def render(record: dict[str, Any]) -> str:
    """A transcript as plain text: the prompt, each turn on its own line with its role, the reward."""
    lines = [f"[{record.get('domain', '')}] reward {_number(record.get('reward'))}"
             + (f"  (reference: {record['reference']})" if record.get("reference") not in (None, "") else ""),
             f"user: {record.get('prompt', '')}"]
    for turn in record.get("turns", []):
        if not isinstance(turn, dict):
            continue
        note = [] if turn.get("role") != "assistant" else ["tool call"] if turn.get("tool_call") else []
        if isinstance(turn.get("teacher_kl"), (int, float)):
            note.append(f"teacher KL {turn['teacher_kl']:.3f}")
        lines.append(f"{turn.get('role', '?')}: {turn.get('text', '')}" + (f"  ({', '.join(note)})" if note else ""))
    return "\n".join(lines)


def _number(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def best_and_worst(records: list[dict[str, Any]], per_domain: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """("best" | "worst", record): each domain's `per_domain` highest- and lowest-reward transcripts (first in
    file order on ties; a domain with fewer records shows each once)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for d in sorted({str(r.get("domain", "")) for r in records}):
        mine = [r for r in records if str(r.get("domain", "")) == d and isinstance(r.get("reward"), (int, float))]
        ranked = sorted(range(len(mine)), key=lambda i: (-mine[i]["reward"], i))
        best = ranked[:per_domain]
        worst = [i for i in reversed(ranked) if i not in best][:per_domain]
        out += [("best", mine[i]) for i in best] + [("worst", mine[i]) for i in worst]
    return out
