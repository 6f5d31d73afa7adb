"""A `verifiers` domain's `demonstration:` (issue 38): the gold turns SFT trains on, from a file or a generator.

    domains:
      - {name: calc, verifiers: my_calc_env, demonstration: calc_demos.jsonl}      # one record per task
      - {name: calc, verifiers: my_calc_env, demonstration: demos.py:demonstrate}  # a function of a task's data
      - {name: calc, verifiers: my_calc_env, demonstration: my_calc_env.demos:demonstrate}

A file holds one JSON object per line, `{"prompt": <the task's prompt text>, "turns": ["mul:12,34", "408"]}`: the
model turns of a perfect agent, tool calls in mopd's format then the answer (the observations come from playing
them through the taskset's tools). A generator is what `register_verifiers_domain(..., demonstration=)` takes: a
function from a task's data to those turns. Why both: a file is data a user can write without code (or export
from another agent's traces); a generator covers a taskset of thousands of tasks generated on the fly.

Every mistake is a ValueError of one line, which the loader reports at the key (`recipe.resources`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

Demonstration = Callable[[Any], list[str]] | Mapping[str, list[str]]


def load_demonstration(ref: str, base: Path) -> Demonstration:
    """The table of turns by prompt in a .jsonl file (`ref` relative to `base`, the recipe's folder), or the
    function `ref` names (`file.py:function`, `package.module:function`)."""
    if ref.endswith(".jsonl"):
        return _read_file(Path(ref) if Path(ref).is_absolute() else base / ref)
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"{ref!r}: not a .jsonl file nor a generator `file.py:function` / `module:function`")
    if where.endswith(".py"):
        path = Path(where) if Path(where).is_absolute() else base / where
        if not path.is_file():
            raise ValueError(f"{ref!r}: {path} is not a file")
        spec = importlib.util.spec_from_file_location(f"mopd_demonstration_{abs(hash(str(path)))}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's code: whatever it raises is one line
            raise ValueError(f"{ref!r}: {path} raised {type(e).__name__}: {_first(e)}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ValueError(f"{ref!r}: cannot import {where!r} ({type(e).__name__}: {_first(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{ref!r}: {where} has no function {name!r}")
    return fn


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _read_file(path: Path) -> dict[str, list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__})") from None
    table: dict[str, list[str]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
        turns = record.get("turns") if isinstance(record, dict) else None
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(turns, list)
                and turns and all(isinstance(t, str) for t in turns)):
            raise ValueError(f'{path}:{i}: each line is {{"prompt": "...", "turns": ["...", ...]}} (a non-empty '
                             "list of the model's turns)")
        if record["prompt"] in table:
            raise ValueError(f"{path}:{i}: a second demonstration of the prompt {record['prompt']!r}")
        table[record["prompt"]] = turns
    if not table:
        raise ValueError(f"{path}: no demonstration in it")
    return table
