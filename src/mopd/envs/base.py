"""Verifiable domains: problems, rewards, a name registry and plugin loading.

A *domain* is a generator `fn(rng, difficulty) -> (prompt, answer)` plus a verifier
`verify(problem, completion) -> float in [0, 1]`. Register one with the `@register_domain`
decorator; recipes refer to domains by name, and user files add more via `load_plugin`.

Held-out discipline: `Domain.eval_set(n, seed)` is a fixed, deduplicated evaluation set, and
`Domain.sample_train(rng, n, exclude=...)` resamples any prompt in `exclude`, so passing
`domain.held_out_prompts(n, seed)` as `exclude` guarantees no eval prompt is ever trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from ..core.errors import StageError
from ..core.schema.defaults import HELD_OUT_SEED

# The character-level tokenizer is built from exactly this alphabet (order fixes the token ids).
ALPHABET: str = "0123456789abcdefghijklmnopqrstuvwxyz+*=:,- "
_ALPHABET_SET = frozenset(ALPHABET)

Generator = Callable[[random.Random, int], tuple[str, str]]
Verifier = Callable[["Problem", str], float]

# A sample is retried at most this many times when it lands on an excluded (held-out) prompt.
_MAX_TRAIN_RETRIES = 1000
# eval_set stops drawing from a difficulty once repeats exceed max(_SAT_MIN, _SAT_RATIO * unique):
# its prompt space is then mostly used up, and the remainder of the quota moves to other difficulties,
# which keeps most of a small space (e.g. 1-digit x 1-digit) available for training.
_SAT_MIN = 4
_SAT_RATIO = 0.25


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the reference completion text, without any EOS
    domain: str
    difficulty: int
    # What a data-backed domain's verifier needs beyond `answer` (e.g. "tests", "constraints"). Not part of
    # equality or hashing: a problem is identified by its prompt, and a dict is not hashable.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def exact_match(problem: Problem, completion: str) -> bool:
    """True when the completion, stripped of surrounding whitespace, equals the reference answer."""
    return completion.strip() == problem.answer


def partial_match_reward(problem: Problem, completion: str) -> float:
    """Dense reward in [0, 1]: 1.0 for an exact match, else 0.5 * positional agreement.

    Non-exact credit is `0.5 * #{i : completion[i] == answer[i]} / max(len(answer), len(completion))`
    on the stripped completion (empty -> 0). Why dense: on-policy RL from a tiny, barely trained model
    almost never hits an exact answer early on, so a 0/1 reward is zero for nearly every rollout and the
    group-relative advantage vanishes. Per-position credit ranks near misses above garbage, which gives
    a gradient from step one; capping it at 0.5 keeps an exact answer strictly the best outcome, and the
    `max(...)` denominator penalises answers that are too long or too short.
    """
    text = completion.strip()
    answer = problem.answer
    if text == answer:
        return 1.0
    if not text or not answer:
        return 0.0
    hits = sum(1 for a, b in zip(text, answer, strict=False) if a == b)
    return 0.5 * hits / max(len(answer), len(text))


@dataclass(frozen=True)
class Domain:
    name: str
    generate: Generator
    verify: Verifier
    difficulties: tuple[int, ...]
    description: str
    # False: `verify` measures the domain for the held-out report, but is no training reward (a domain with no
    # rule-based answer, e.g. `style`: its reward is a judge's or a reward model's; the loader enforces it)
    rule_reward: bool = True
    # greedy tokens per held-out prompt in evaluation (`eval.evaluate`); None: the recipe's `eval.max_new_tokens`.
    # Real-text answers need more than the character puzzles' 12
    max_new_tokens: int | None = None
    # the characters prompts and answers may use: the character tokenizer's ALPHABET, or e.g. string.printable for
    # real-text domains (a recipe training its own character model on them sets `tokenizer: {alphabet: printable}`)
    alphabet: str = ALPHABET

    def _check_difficulty(self, difficulty: int) -> None:
        if difficulty not in self.difficulties:
            raise ValueError(
                f"domain {self.name!r} has no difficulty {difficulty!r}; choose from {list(self.difficulties)}"
            )

    def _make(self, rng: random.Random, difficulty: int) -> Problem:
        try:
            out = self.generate(rng, difficulty)
        except (Exception, SystemExit) as e:  # plugin code: its failure is the domain's, named in one line
            raise DomainError(f"domain {self.name!r}: its generator raised {e.__class__.__name__} at difficulty "
                              f"{difficulty}: {e}") from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(s, str) for s in out)):
            raise DomainError(
                f"domain {self.name!r}: generator must return (prompt: str, answer: str), got {out!r}"
            )
        prompt, answer = out
        if not prompt or not answer:
            raise DomainError(f"domain {self.name!r}: empty prompt or answer in {out!r}")
        own = self.alphabet != ALPHABET  # a real-text domain's own alphabet (e.g. string.printable)
        bad = sorted(set(prompt + answer) - (set(self.alphabet) if own else _ALPHABET_SET))
        if bad:
            raise DomainError(f"domain {self.name!r}: characters {bad!r} in {out!r} are outside "
                              f"{'its alphabet' if own else 'ALPHABET'} {self.alphabet!r}")
        return Problem(prompt=prompt, answer=answer, domain=self.name, difficulty=difficulty)

    def sample(self, rng: random.Random, difficulty: int | None = None) -> Problem:
        """One problem; `difficulty=None` draws the difficulty uniformly from `self.difficulties`."""
        if difficulty is None:
            difficulty = rng.choice(self.difficulties)
        self._check_difficulty(difficulty)
        return self._make(rng, difficulty)

    def sample_train(
        self,
        rng: random.Random,
        n: int,
        difficulty: int | None = None,
        exclude: frozenset[str] = frozenset(),
    ) -> list[Problem]:
        """`n` training problems, none of whose prompts is in `exclude` (excluded draws are resampled).

        The difficulty of each sample is fixed before resampling, so exclusion does not skew the mix.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if difficulty is not None:
            self._check_difficulty(difficulty)
        out: list[Problem] = []
        for _ in range(n):
            d = rng.choice(self.difficulties) if difficulty is None else difficulty
            for _ in range(_MAX_TRAIN_RETRIES):
                problem = self._make(rng, d)
                if problem.prompt not in exclude:
                    out.append(problem)
                    break
            else:
                raise RuntimeError(
                    f"domain {self.name!r}, difficulty {d}: {_MAX_TRAIN_RETRIES} draws in a row were all "
                    "excluded (held-out) prompts; the eval set covers nearly this whole prompt space"
                )
        return out

    def eval_set(self, n: int, seed: int = HELD_OUT_SEED) -> list[Problem]:
        """Fixed held-out set: deterministic in (domain name, n, seed), unique prompts, even over difficulties.

        Each difficulty gets `n // k` problems (the first `n % k` one more). A difficulty whose prompt space
        runs out (too many repeated draws) stops early and its shortfall moves to the others. Ordered by
        difficulty. Raises DomainError if the domain cannot supply `n` distinct prompts.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        diffs = self.difficulties
        rngs = {d: random.Random(f"mopd-eval:{self.name}:{seed}:{d}") for d in diffs}
        picked: dict[int, list[Problem]] = {d: [] for d in diffs}
        repeats = dict.fromkeys(diffs, 0)
        seen: set[str] = set()
        open_diffs = list(diffs)
        quota = dict.fromkeys(diffs, 0)
        while open_diffs:
            missing = n - sum(len(v) for v in picked.values())
            if missing <= 0:
                break
            share, extra = divmod(missing, len(open_diffs))
            for i, d in enumerate(open_diffs):
                quota[d] = len(picked[d]) + share + (1 if i < extra else 0)
            for d in list(open_diffs):
                while len(picked[d]) < quota[d]:
                    problem = self._make(rngs[d], d)
                    if problem.prompt in seen:
                        repeats[d] += 1
                        if repeats[d] > max(_SAT_MIN, _SAT_RATIO * len(picked[d])):
                            open_diffs.remove(d)
                            break
                        continue
                    seen.add(problem.prompt)
                    picked[d].append(problem)
        total = sum(len(v) for v in picked.values())
        if total < n:
            raise DomainError(
                f"domain {self.name!r} cannot supply {n} distinct held-out prompts without exhausting "
                f"its prompt space (got {total}); ask for a smaller eval set"
            )
        return [p for d in diffs for p in picked[d]]

    def held_out_prompts(self, n: int, seed: int = HELD_OUT_SEED) -> frozenset[str]:
        """The prompts of `eval_set(n, seed)`: pass as `exclude` to `sample_train`."""
        return frozenset(p.prompt for p in self.eval_set(n, seed))


# ---------------------------------------------------------------------------------------------- registry


class DomainLike(Protocol):
    """What the rest of mopd uses of a domain: `Domain` (generated prompts) and `envs.data.DataDomain` both fit."""

    name: str
    difficulties: tuple[int, ...]
    description: str

    def verify(self, problem: Problem, completion: str) -> float: ...

    def sample_train(
        self, rng: random.Random, n: int, difficulty: int | None = None, exclude: frozenset[str] = frozenset()
    ) -> list[Problem]: ...

    def eval_set(self, n: int, seed: int = HELD_OUT_SEED) -> list[Problem]: ...

    def held_out_prompts(self, n: int, seed: int = HELD_OUT_SEED) -> frozenset[str]: ...


# name -> Domain: the built-in domains and those plugins register. A recipe reads it once, when it is loaded
# (`recipe.load`); stages get their domains from the loaded recipe, never from here.
_REGISTRY: dict[str, Domain] = {}


def _same_function(a: Callable, b: Callable) -> bool:
    """Same object, or the same source-level function re-created by re-importing its module."""
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    return (
        ca is not None
        and cb is not None
        and getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
        and ca.co_code == cb.co_code
        and ca.co_consts == cb.co_consts
    )


class DomainError(StageError):
    """A domain's own code (a plugin's generator or verifier) failed or broke its contract; str() is one line."""


def guarded_verifier(name: str, verify: Verifier) -> Verifier:
    """`verify` whose failures and out-of-contract rewards (not a number in [0, 1]) are one DomainError line:
    a verifier is plugin code, and a NaN reward would otherwise flow silently into the advantages."""

    def checked(problem: Problem, completion: str) -> float:
        try:
            r = verify(problem, completion)
        except (Exception, SystemExit) as e:
            raise DomainError(f"domain {name!r}: its verifier raised {e.__class__.__name__}: {e}") from None
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0.0 <= r <= 1.0:
            raise DomainError(f"domain {name!r}: its verifier returned {r!r}, not a number in [0, 1]")
        return float(r)

    checked.__wrapped__ = verify  # type: ignore[attr-defined]
    return checked


def domain_problem(domain: Domain, eval_size: int, eval_seed: int, draws: int = 4) -> str | None:
    """None when `domain` generates and verifies a few problems of every difficulty as its contract says and can
    supply its held-out set; else the one line of the first failure. Run at load, so a broken plugin domain fails
    before any compute."""
    rng = random.Random(0)
    try:
        domain.eval_set(eval_size, eval_seed)
        for difficulty in domain.difficulties:
            for _ in range(draws):
                problem = domain._make(rng, difficulty)
                domain.verify(problem, problem.answer)
                domain.verify(problem, "")
    except DomainError as e:
        return str(e)
    return None


def register_domain(
    name: str,
    *,
    difficulties: tuple[int, ...] = (1, 2, 3),
    verify: Verifier | None = None,
    description: str = "",
    rule_reward: bool = True,
    max_new_tokens: int | None = None,
    alphabet: str = ALPHABET,
) -> Callable[[Generator], Generator]:
    """Decorator registering `fn(rng, difficulty) -> (prompt, answer)` as domain `name`; returns `fn` unchanged.

    `verify` defaults to `partial_match_reward`; `rule_reward=False` marks a `verify` that only measures the
    domain for the report and may not be a training reward (see `Domain.rule_reward`); `max_new_tokens` is the
    domain's own generation length in held-out evaluation (None: `eval.max_new_tokens`); `alphabet` the characters
    its prompts and answers may use (`string.printable` for real text). Registering the same
    generator again is a no-op (the first registration is kept); registering a different generator under a taken name raises ValueError.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"domain name must be a non-empty string, got {name!r}")
    diffs = check_difficulties(difficulties)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens <= 0):
        raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")

    def decorator(fn: Generator) -> Generator:
        if not callable(fn):
            raise TypeError(f"register_domain({name!r}) must decorate a callable, got {fn!r}")
        add_domain(fn, lambda: Domain(
            name=name,
            generate=fn,
            verify=guarded_verifier(name, verify if verify is not None else partial_match_reward),
            difficulties=diffs,
            description=description,
            rule_reward=rule_reward,
            max_new_tokens=max_new_tokens,
            alphabet=alphabet,
        ), name)
        return fn

    return decorator


def check_difficulties(difficulties: tuple[int, ...]) -> tuple[int, ...]:
    """`difficulties` as a tuple, or the ValueError that says what is wrong with them."""
    diffs = tuple(difficulties)
    if not diffs or not all(isinstance(d, int) and not isinstance(d, bool) for d in diffs):
        raise ValueError(f"difficulties must be a non-empty tuple of ints, got {difficulties!r}")
    if len(set(diffs)) != len(diffs):
        raise ValueError(f"duplicate difficulties in {difficulties!r}")
    return diffs


def add_domain(fn: Generator, build: Callable[[], Domain], name: str) -> None:
    """Register the domain `build()` makes for generator `fn` under `name`: a no-op when the same generator is
    registered there already (a plugin imported twice), a ValueError when another one is."""
    existing = _REGISTRY.get(name)
    if existing is not None:
        if _same_function(existing.generate, fn):
            return
        raise ValueError(
            f"domain {name!r} is already registered by {existing.generate.__module__}."
            f"{getattr(existing.generate, '__qualname__', existing.generate)!s}; pick another name"
        )
    _REGISTRY[name] = build()


def get_domain(name: str) -> Domain:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown domain {name!r}; known domains: {known}") from None


def list_domains() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------- plugins


def load_plugin(path: str | Path, relative_to: str | Path | None = None) -> ModuleType:
    """Import a user Python file by path so its `@register_domain` calls run; returns the module.

    A relative `path` is resolved against `relative_to` (a directory, or a file whose directory is used,
    e.g. the recipe file) when given, else against the current directory. Loading the same file twice
    returns the already-imported module without re-running it.
    """
    p = Path(path).expanduser()
    if not p.is_absolute() and relative_to is not None:
        base = Path(relative_to).expanduser()
        p = (base if base.is_dir() else base.parent) / p
    p = p.resolve()
    if not p.is_file():
        raise FileNotFoundError(f"domain plugin not found: {p} (given as {str(path)!r})")
    if p.suffix != ".py":
        raise ValueError(f"domain plugin must be a .py file, got {p}")
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:12]
    mod_name = f"mopd_plugin_{p.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, p)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import domain plugin {p}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(mod_name, None)
        raise
    return module
