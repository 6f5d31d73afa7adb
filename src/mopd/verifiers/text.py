"""Rewards for short real-text answers: the last number, a JSON object's fields, an exact word with partial credit.

Each maps a completion (and the reference answer) to a float in [0, 1] and never raises on a bad completion:

* ``last_number_reward(completion, reference)`` -> 1.0 when the last number in the completion equals the
  reference number (``"9 + 8 = 17"`` against ``17``), else 0.0; a thousands separator (``1,000``) is read as one
  number, and a minus sign after a digit or ``)`` is a subtraction, not a sign (``"11 -5"`` ends with 5);
* ``json_fields_reward(completion, reference)`` -> the share of the reference object's fields the completion's
  JSON object gets right (values equal, a number is not a string, over the larger of the two key counts, so extra
  keys cost too), times 1.0 when the whole reply parses as that object (what a program reading the reply needs)
  and 0.5 when the object is found inside other text (a ```json fence, prose around it); 0.0 without one;
* ``exact_text_reward(completion, reference)`` -> 1.0 for the reference alone (surrounding whitespace, quotes
  and one trailing period ignored), 0.5 when the reference occurs as a whole word inside a longer reply (right
  answer, wrong format), else partial credit below 0.5 for the reply's first words (as many as the reference
  has, punctuation around them dropped): ``0.5 * positional agreement / max(len(head), len(reference))``, a
  position agreeing 1 for the same character and 0.5 for the same letter in the other case. So ``Potato`` or
  ``Potato: a vegetable`` for ``POTATO`` earns 0.29, ``POTATOES`` 0.38, ``The word "potato"`` nothing: a reply
  that starts with the answer is a step towards it, which gives RL a signal before any reply is right.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

__all__ = ["exact_text_reward", "json_fields_reward", "last_number", "last_number_reward", "trim_reply"]

_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_QUOTES = "\"'`“”‘’"


def last_number(text: str) -> float | None:
    """The last number in `text` (as a float), or None when there is none."""
    if not isinstance(text, str):
        return None
    text = _THOUSANDS_RE.sub("", text)
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    match = matches[-1]
    number = match.group()
    before = text[: match.start()].rstrip()
    if number.startswith("-") and before and (before[-1].isdigit() or before[-1] == ")"):
        number = number[1:]  # "11 -5", "(2+3)-4": a subtraction, not a negative number
    return float(number)


def last_number_reward(completion: str, reference: str) -> float:
    """1.0 when the completion's last number equals the reference number, else 0.0."""
    got, want = last_number(completion), last_number(reference)
    return float(got is not None and want is not None and got == want)


def _objects(text: str) -> list[Any]:
    """Every JSON value that starts at a `{` in `text` and decodes from there, in order of position."""
    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        out.append(value)
        i = text.find("{", end)
    return out


def json_fields_reward(completion: str, reference: str) -> float:
    """Share of the reference object's fields right, times 1.0 (the reply is the object) or 0.5 (object in text)."""
    if not isinstance(completion, str):
        return 0.0
    want = json.loads(reference)
    text = completion.strip()
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        got, factor = whole, 1.0
    else:
        found = [o for o in _objects(text) if isinstance(o, dict)]
        if not found:
            return 0.0
        got, factor = found[0], 0.5
    right = sum(1 for k, v in want.items() if k in got and _same_value(got[k], v))
    return factor * right / max(len(want), len(got))


def _same_value(a: Any, b: Any) -> bool:
    """Equal JSON values; a number is not equal to a string (`"34"` is not `34`), and bool is not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def trim_reply(text: str) -> str:
    """The reply without surrounding whitespace and quotes, and without one trailing period."""
    t = text.strip().strip(_QUOTES).strip()
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1].rstrip().strip(_QUOTES).strip()
    return t


def exact_text_reward(completion: str, reference: str) -> float:
    """1.0 for the reference alone; 0.5 for the reference as a whole word in a longer reply; else < 0.5 partial
    credit for the reply's first words (see the module docstring)."""
    if not isinstance(completion, str) or not reference:
        return 0.0
    text = trim_reply(completion)
    if text == reference:
        return 1.0
    if not text:
        return 0.0
    if re.search(r"(?<!\w)" + re.escape(reference) + r"(?!\w)", text):
        return 0.5
    head = " ".join(text.split()[: len(reference.split())]).strip(string.punctuation + _QUOTES)
    if not head:
        return 0.0
    if head == reference:  # the answer, then more (other separators than the contains test above allows)
        return 0.5
    hits = sum(1.0 if a == b else 0.5 if a.lower() == b.lower() else 0.0
               for a, b in zip(head, reference, strict=False))
    return 0.5 * hits / max(len(head), len(reference))  # < 0.5: the reference itself was found above
