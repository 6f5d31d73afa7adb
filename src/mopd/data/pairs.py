"""Preference pairs from a JSONL file (`pairs_from: {dataset: PATH}` of the dpo and reward_model stages).

One JSON object a line: {"prompt": str, "chosen": str, "rejected": str} and optionally "domain" (default: the
empty name, which only labels rows). Blank lines are skipped. Every mistake is a ValueError of one line naming
the file and line: a missing or non-string field, a pair whose chosen equals its rejected answer (it carries no
preference), an empty file. Every `HELD_OUT_EVERY`-th pair (the 10th, 20th, ...) is held out for the stage's
pair accuracy and never trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    domain: str = ""


def read_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such preference dataset (a JSONL file of prompt, chosen, rejected)")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: a pair is a JSON object with prompt, chosen and rejected")
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}:{n}: `{key}` must be a non-empty string")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"{path}:{n}: chosen equals rejected, so the pair states no preference")
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"], str(row.get("domain", ""))))
    if len(pairs) < 2:
        raise ValueError(f"{path}: {len(pairs)} pair(s); at least 2 are needed (every {HELD_OUT_EVERY}th is held out)")
    return pairs


def split_pairs(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs): every `HELD_OUT_EVERY`-th pair is held out (at least the last one)."""
    held = [i for i in range(len(pairs)) if (i + 1) % HELD_OUT_EVERY == 0] or [len(pairs) - 1]
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in held]
