"""Instruction-following verifier: constraints declared as data, each checked by a pure function.

A constraint is a dict with a ``type`` and that type's parameters, e.g. ``{"type": "max_words", "n": 50}``.
``instruction_reward(completion, constraints)`` is the fraction of constraints the completion satisfies.
Call ``validate_constraints`` when loading data: an unknown type, a missing, unexpected or ill-typed
parameter raises ``ValueError`` there (and again in ``instruction_reward``), never silently scores 0.

=================  =====================  =================================================================
type               parameters             satisfied when
=================  =====================  =================================================================
max_words          n                      at most n words (a word: letters/digits, inner ' or - allowed)
min_words          n                      at least n words
max_chars          n                      at most n characters (surrounding whitespace ignored)
forbidden_words    words                  none of the words/phrases occurs (whole word, any case)
required_words     words                  every word/phrase occurs (whole word, any case)
starts_with        text, [case_sensitive] the stripped text starts with ``text`` (default: any case)
ends_with          text, [case_sensitive] the stripped text ends with ``text`` (default: any case)
all_lowercase                             there are letters and none is upper case
all_uppercase                             there are letters and none is lower case
json_format                               the whole reply (an optional ```json fence aside) parses as a
                                          JSON object or array
bullet_points      n                      exactly n lines are markdown bullets (``* ``, ``- `` or ``• ``)
num_paragraphs     n                      exactly n paragraphs (non-empty blocks between blank lines)
no_commas                                 no comma (ASCII or full-width) anywhere
=================  =====================  =================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONSTRAINT_TYPES",
    "check_constraint",
    "instruction_reward",
    "validate_constraints",
]

_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")
_BULLET_RE = re.compile(r"^[ \t]*[*\-•][ \t]+\S", re.MULTILINE)
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n")
_JSON_FENCE_RE = re.compile(r"^```[ \t]*(?:json)?[ \t]*\n(.*)\n[ \t]*```$", re.DOTALL | re.IGNORECASE)


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _contains_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE) is not None


def _affix(text: str, affix: str, case_sensitive: bool, start: bool) -> bool:
    body = text.strip()
    if not case_sensitive:
        body, affix = body.casefold(), affix.casefold()
    return body.startswith(affix) if start else body.endswith(affix)


def _is_json(text: str) -> bool:
    body = text.strip()
    m = _JSON_FENCE_RE.match(body)
    if m:
        body = m.group(1).strip()
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, (dict, list))


def _paragraphs(text: str) -> list[str]:
    return [p for p in _PARAGRAPH_SPLIT_RE.split(text.strip()) if p.strip()]


@dataclass(frozen=True)
class _Rule:
    check: Callable[..., bool]
    params: dict[str, str] = field(default_factory=dict)  # name -> kind
    optional: dict[str, str] = field(default_factory=dict)


_RULES: dict[str, _Rule] = {
    "max_words": _Rule(lambda t, n: len(_words(t)) <= n, {"n": "count"}),
    "min_words": _Rule(lambda t, n: len(_words(t)) >= n, {"n": "count"}),
    "max_chars": _Rule(lambda t, n: len(t.strip()) <= n, {"n": "count"}),
    "forbidden_words": _Rule(
        lambda t, words: not any(_contains_phrase(t, w) for w in words), {"words": "words"}
    ),
    "required_words": _Rule(lambda t, words: all(_contains_phrase(t, w) for w in words), {"words": "words"}),
    "starts_with": _Rule(
        lambda t, text, case_sensitive=False: _affix(t, text, case_sensitive, start=True),
        {"text": "text"},
        {"case_sensitive": "bool"},
    ),
    "ends_with": _Rule(
        lambda t, text, case_sensitive=False: _affix(t, text, case_sensitive, start=False),
        {"text": "text"},
        {"case_sensitive": "bool"},
    ),
    "all_lowercase": _Rule(lambda t: t != t.upper() and t == t.lower()),
    "all_uppercase": _Rule(lambda t: t != t.lower() and t == t.upper()),
    "json_format": _Rule(_is_json),
    "bullet_points": _Rule(lambda t, n: len(_BULLET_RE.findall(t)) == n, {"n": "count"}),
    "num_paragraphs": _Rule(lambda t, n: len(_paragraphs(t)) == n, {"n": "count"}),
    "no_commas": _Rule(lambda t: "," not in t and "，" not in t),
}

CONSTRAINT_TYPES: tuple[str, ...] = tuple(sorted(_RULES))


def _check_param(kind: str, value: Any) -> bool:
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "words":
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(w, str) and w.strip() for w in value)
        )
    if kind == "text":
        return isinstance(value, str) and value.strip() != ""
    if kind == "bool":
        return isinstance(value, bool)
    raise AssertionError(kind)


_KIND_HELP = {
    "count": "a non-negative integer",
    "words": "a non-empty list of non-empty strings",
    "text": "a non-empty string",
    "bool": "true or false",
}


def _normalize(constraint: Any, index: int) -> dict:
    if not isinstance(constraint, dict):
        raise ValueError(
            f"constraint {index}: expected a dict with a 'type', got {type(constraint).__name__}"
        )
    # Columnar formats (parquet, datasets) fill absent struct fields with None: treat those as absent.
    c = {k: v for k, v in constraint.items() if v is not None}
    ctype = c.get("type")
    if ctype not in _RULES:
        raise ValueError(
            f"constraint {index}: unknown type {ctype!r}; known types: {', '.join(CONSTRAINT_TYPES)}"
        )
    rule = _RULES[ctype]
    for name in rule.params:
        if name not in c:
            raise ValueError(f"constraint {index} ({ctype}): missing parameter {name!r}")
    for name, value in c.items():
        if name == "type":
            continue
        kind = rule.params.get(name) or rule.optional.get(name)
        if kind is None:
            allowed = ", ".join([*rule.params, *rule.optional]) or "none"
            raise ValueError(
                f"constraint {index} ({ctype}): unexpected parameter {name!r}; allowed: {allowed}"
            )
        if not _check_param(kind, value):
            raise ValueError(
                f"constraint {index} ({ctype}): {name!r} must be {_KIND_HELP[kind]}, got {value!r}"
            )
    return c


def validate_constraints(constraints: Any) -> list[dict]:
    """Check a constraint list; returns normalized copies. Raises ``ValueError`` naming the bad entry."""
    if not isinstance(constraints, (list, tuple)) or not constraints:
        raise ValueError("constraints must be a non-empty list of dicts")
    return [_normalize(c, i) for i, c in enumerate(constraints)]


def check_constraint(completion: str, constraint: dict) -> bool:
    """Whether ``completion`` satisfies one (valid) constraint; False for a non-string completion."""
    c = _normalize(constraint, 0)
    if not isinstance(completion, str):
        return False
    args = {k: v for k, v in c.items() if k != "type"}
    return bool(_RULES[c["type"]].check(completion, **args))


def instruction_reward(completion: str, constraints: list[dict]) -> float:
    """Fraction of ``constraints`` satisfied by ``completion`` (0.0 for a non-string completion)."""
    normalized = validate_constraints(constraints)
    if not isinstance(completion, str):
        return 0.0
    return sum(check_constraint(completion, c) for c in normalized) / len(normalized)
