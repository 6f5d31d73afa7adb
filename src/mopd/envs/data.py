"""Data-backed domains: prompts from a file or dataset, rewards from a real verifier.

A recipe declares one as a mapping in `domains:` (see `core.schema.DataDomainSpec`); `DataDomain` gives it the
interface every stage already uses for generated domains (`sample_train`, `eval_set`, `held_out_prompts`,
`verify`), so sampling, routing, rewards and evaluation need no special case.

Held-out discipline: the records are de-duplicated by prompt and split once, deterministically in
(domain name, eval seed), into a held-out part and a training part (or the held-out part is read from
`eval_split`, and any training record with a held-out prompt is dropped). `sample_train` only ever draws from
the training part, so no eval prompt is trained on whatever `exclude` the caller passes.

Records come from `mopd.data.load_prompts`. A local source is read when the recipe is loaded, so a missing
column or a record the verifier cannot score fails before any compute; a Hub dataset id is read only when a
stage first needs the domain (validation never downloads).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.schema.defaults import HELD_OUT_SEED, HELD_OUT_SIZE
from ..data.prompts import PromptRecord, bundled_path, load_prompts
from ..verifiers import code_reward, instruction_reward, math_reward
from .base import Problem, exact_match

VERIFIERS: tuple[str, ...] = ("math", "code", "instructions", "exact")
# what each verifier reads from a record, as (our field, where it lives on the Problem)
_NEEDS: dict[str, str] = {"math": "answer", "exact": "answer", "code": "tests", "instructions": "constraints"}


class DataDomainError(ValueError):
    """A data domain's declaration or data is wrong; `key` is the offending key inside the declaration."""

    def __init__(self, key: tuple, message: str):
        super().__init__(message)
        self.key = key


def resolve_source(source: str, base_dir: Path | None) -> tuple[str, bool]:
    """(what to pass to `load_prompts`, whether it is local). Relative paths are taken from the recipe's folder."""
    if source.startswith("bundled:"):
        try:
            return str(bundled_path(source.split(":", 1)[1])), True
        except ValueError as e:
            raise DataDomainError(("source",), str(e)) from None
    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.exists():
        return str(p.resolve()), True
    if source.startswith((".", "/", "~")) or Path(source).suffix:
        raise DataDomainError(("source",), f"{source!r}: no such file or directory")
    return source, False  # a Hub dataset id: read on first use


def held_out_split(problems: list[Problem], rng_seed: str, eval_size: int | None, label: str,
                   default_eval_size: int = HELD_OUT_SIZE) -> tuple[list[Problem], list[Problem]]:
    """(training part, held-out part) of distinct-prompt `problems`: `eval_size` of them (default: a quarter, at
    most `default_eval_size`) held out, chosen once by `rng_seed`, each part in the original order."""
    if len(problems) < 2:
        raise DataDomainError(("source",), f"{label}: {len(problems)} distinct prompt(s); need at least 2 to hold "
                              "one out")
    n_eval = eval_size or min(default_eval_size, max(1, len(problems) // 4))
    if n_eval >= len(problems):
        raise DataDomainError(("eval_size",),
                              f"eval_size {n_eval} leaves no training prompt ({len(problems)} distinct prompts in "
                              f"{label})")
    order = list(range(len(problems)))
    random.Random(rng_seed).shuffle(order)
    return [problems[i] for i in sorted(order[n_eval:])], [problems[i] for i in sorted(order[:n_eval])]


class DataDomain:
    """A domain whose problems are records of a dataset, scored by one of `VERIFIERS`."""

    difficulties: tuple[int, ...] = (1,)  # records carry no difficulty level

    def __init__(
        self,
        name: str,
        source: str,
        verifier: str,
        *,
        fields: dict[str, str] | None = None,
        format: str | None = None,
        split: str = "train",
        eval_split: str | None = None,
        domain_column: str | None = None,
        domain_value: str | None = None,
        eval_size: int | None = None,
        default_eval_size: int = HELD_OUT_SIZE,
        limit: int | None = None,
        seed: int = HELD_OUT_SEED,
        code_timeout_s: float = 5.0,
        base_dir: Path | None = None,
        max_new_tokens: int | None = None,
    ):
        if verifier not in VERIFIERS:
            raise DataDomainError(("verifier",), f"unknown verifier {verifier!r}; choose from {', '.join(VERIFIERS)}")
        self.name = name
        self.verifier = verifier
        self.description = f"{source} ({verifier} verifier)"
        self._source, self.local = resolve_source(source, base_dir)
        self._label = source
        self._fields = dict(fields or {})
        self._format, self._split, self._eval_split = format, split, eval_split
        self._domain_column = domain_column or ("domain" if domain_value is not None else None)
        self._domain_value = domain_value
        self._eval_size, self._default_eval_size = eval_size, default_eval_size
        self._limit, self._seed, self._code_timeout_s = limit, seed, code_timeout_s
        self.max_new_tokens = max_new_tokens  # held-out generation length; None: eval.max_new_tokens
        self._parts: tuple[list[Problem], list[Problem]] | None = None  # (train, held_out), loaded once

    # ------------------------------------------------------------------------------------------ loading

    def load(self) -> DataDomain:
        """Read and split the records now (the recipe loader calls this for local sources); returns self."""
        self._data()
        return self

    def _data(self) -> tuple[list[Problem], list[Problem]]:
        if self._parts is None:
            self._parts = self._split_records()
        return self._parts

    def _read(self, split: str) -> list[Problem]:
        fmap = {"prompt": self._fields.get("prompt", "prompt")}
        for ours, theirs in (("answer", "reference"), ("tests", "tests"), ("constraints", "constraints")):
            if ours in self._fields:
                fmap[theirs] = self._fields[ours]
        try:
            records = load_prompts(
                self._source, format=self._format, split=split, domain_column=self._domain_column,
                field_map=fmap, domain=None if self._domain_column else self.name,
                limit=None if self._domain_value is not None else self._limit,
            )
        except (ValueError, FileNotFoundError, ImportError) as e:
            key = next((("fields", ours) for ours, theirs in (("answer", "reference"), *(
                (f, f) for f in ("prompt", "tests", "constraints"))) if f"(mapped from {theirs!r})" in str(e)),
                ("source",))
            raise DataDomainError(key, str(e)) from None
        if self._domain_value is not None:
            records = [r for r in records if r.domain == self._domain_value][: self._limit]
            if not records:
                raise DataDomainError(
                    ("domain_value",), f"{self._label}: no record has {self._domain_column} == {self._domain_value!r}"
                )
        problems: dict[str, Problem] = {}
        for i, r in enumerate(records):
            if r.prompt not in problems:  # duplicates would leak between the held-out and training parts
                problems[r.prompt] = self._problem(r, i)
        return list(problems.values())

    def _problem(self, record: PromptRecord, index: int) -> Problem:
        need = _NEEDS[self.verifier]
        have = record.reference if need == "answer" else record.meta.get(need)
        if have is None or (isinstance(have, str) and not have.strip()):
            column = self._fields.get(need, "answer' or 'reference" if need == "answer" else need)
            raise DataDomainError(
                ("fields", need),
                f"{self._label}: record {index} has no {need} (column '{column}'), which the {self.verifier} "
                "verifier needs",
            )
        if need == "tests" and not (
            (isinstance(have, str) and have.strip())
            or (isinstance(have, (list, tuple)) and have and all(isinstance(t, str) and t.strip() for t in have))
        ):
            raise DataDomainError(
                ("fields", "tests"), f"{self._label}: record {index}: tests must be a string or a list of strings"
            )
        meta = {k: record.meta[k] for k in ("tests", "constraints") if k in record.meta}
        return Problem(prompt=record.prompt, answer=record.reference or "", domain=self.name, difficulty=1, meta=meta)

    def _split_records(self) -> tuple[list[Problem], list[Problem]]:
        problems = self._read(self._split)
        if self._eval_split is not None:
            held = self._read(self._eval_split)[: self._eval_size]
            held_prompts = {p.prompt for p in held}
            train = [p for p in problems if p.prompt not in held_prompts]
        else:
            train, held = held_out_split(problems, f"mopd-data:{self.name}:{self._seed}", self._eval_size,
                                         self._label, self._default_eval_size)
        if not train:
            raise DataDomainError(("eval_split",), f"{self._label}: every training prompt is also held out")
        return train, held

    # ------------------------------------------------------------------------------ domain interface

    @property
    def has_answers(self) -> bool:
        """Whether every training record has a reference completion (what SFT trains on)."""
        return all(p.answer for p in self._data()[0])

    def characters(self) -> set[str]:
        """Every character of the prompts and answers (a character tokenizer must cover them)."""
        train, held = self._data()
        return {ch for p in (*train, *held) for ch in p.prompt + p.answer}

    def longest_prompts(self) -> tuple[str, str]:
        """The longest training prompt and the longest held-out one, in characters ('' where there is none):
        what the load-time memory check tokenizes."""
        train, held = self._data()
        return (max((p.prompt for p in train), key=len, default=""), max((p.prompt for p in held), key=len, default=""))

    def held_out_count(self) -> int:
        return len(self._data()[1])

    def verify(self, problem: Problem, completion: str) -> float:
        return float(self._verifier()(problem, completion))

    def _verifier(self) -> Callable[[Problem, str], Any]:
        if self.verifier == "math":
            return lambda p, c: math_reward(c, p.answer)
        if self.verifier == "code":
            return lambda p, c: code_reward(c, p.meta["tests"], timeout_s=self._code_timeout_s)
        if self.verifier == "instructions":
            return lambda p, c: instruction_reward(c, p.meta["constraints"])
        return lambda p, c: 1.0 if exact_match(p, c) else 0.0

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        return rng.choice(self._data()[0])

    def sample_train(
        self, rng: random.Random, n: int, difficulty: int | None = None, exclude: frozenset[str] = frozenset()
    ) -> list[Problem]:
        """`n` training records drawn with replacement, never a held-out prompt nor one in `exclude`."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pool = [p for p in self._data()[0] if p.prompt not in exclude]
        if not pool:
            raise RuntimeError(f"domain {self.name!r}: every training prompt is excluded")
        return [rng.choice(pool) for _ in range(n)]

    def eval_set(self, n: int, seed: int = HELD_OUT_SEED) -> list[Problem]:
        """The fixed held-out records (the first `n` of them). `seed` is fixed when the domain is built."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self._data()[1][:n]

    def held_out_prompts(self, n: int, seed: int = HELD_OUT_SEED) -> frozenset[str]:
        """Every held-out prompt, whatever `n`: a superset of any `eval_set`, so excluding it is always safe."""
        return frozenset(p.prompt for p in self._data()[1])
