"""Built-in synthetic verifiable domains, sized for ~0.4M-parameter character-level models.

Prompts are <= 14 chars and end with "=", answers are <= 8 chars (`style`: both <= 15, its dashes). Each prompt
carries a cue for its domain: the operator for arithmetic ("+" or "*"), a "rev:" / "sort:" prefix for the string
tasks.
"""

from __future__ import annotations

import random
import string

from mopd.envs.base import register_domain

_LETTERS = string.ascii_lowercase
# difficulty -> (min, max) word length for the string tasks
_LENGTH_BANDS = {1: (3, 4), 2: (5, 6), 3: (7, 8)}


def _n_digits(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (1 digit: 0..9)."""
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _rotate(word: str, k: int) -> str:
    """Each lowercase letter moved `k` places on, z wrapping to a."""
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in word)


def _word(rng: random.Random, difficulty: int) -> str:
    lo, hi = _LENGTH_BANDS[difficulty]
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


@register_domain("addition", description="a+b= with the longer operand having `difficulty` digits (1..3)")
def addition(rng: random.Random, difficulty: int) -> tuple[str, str]:
    a = _n_digits(rng, difficulty)
    b = _n_digits(rng, rng.randint(1, difficulty))
    if rng.random() < 0.5:
        a, b = b, a
    return f"{a}+{b}=", str(a + b)


@register_domain(
    "multiplication", description="a*b= with 1x1-digit (d1), 1x2-digit (d2) or 2x2-digit (d3) factors"
)
def multiplication(rng: random.Random, difficulty: int) -> tuple[str, str]:
    one = lambda: rng.randint(1, 9)  # noqa: E731
    two = lambda: rng.randint(10, 99)  # noqa: E731
    if difficulty == 1:
        a, b = one(), one()
    elif difficulty == 2:
        a, b = one(), two()
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a, b = two(), two()
    return f"{a}*{b}=", str(a * b)


@register_domain("reversal", description="rev:WORD= -> WORD reversed; 3-4, 5-6 or 7-8 lowercase letters")
def reversal(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = _word(rng, difficulty)
    return f"rev:{word}=", word[::-1]


@register_domain("sorting", description="sort:WORD= -> the letters of WORD sorted; 3-4, 5-6 or 7-8 letters")
def sorting(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = _word(rng, difficulty)
    return f"sort:{word}=", "".join(sorted(word))


@register_domain("shift", description="shift:WORD= -> each letter moved one place on (z wraps to a); 3-8 letters")
def shift(rng: random.Random, difficulty: int) -> tuple[str, str]:
    word = _word(rng, difficulty)
    return f"shift:{word}=", _rotate(word, 1)


@register_domain(
    "caesar", description="rotK:WORD= -> each letter moved K places on (K = 1..5, z wraps to a); 3-8 letters"
)
def caesar(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """`shift` with the distance in the prompt: the model must read K and apply one of five letter maps, so a
    start that has seen every domain briefly stays well short of it (`shift`'s single map is learned in
    pretraining, and its teachers gain only 0.07 over such a start)."""
    word = _word(rng, difficulty)
    k = rng.randint(1, 5)
    return f"rot{k}:{word}=", _rotate(word, k)


def style_measure(problem, completion: str) -> float:
    """How well a completion keeps the `style` domain's house style: the word's letters, one dash between each
    two (`c-a-t`), in any order. Per position: a letter of the word where a letter belongs, a dash between; the
    count over max(len(completion), len(reference)), so too short and too long both lose. The reference scores 1.
    Reported in the held-out eval only: `style` is judged, not verified (`rule_reward=False`)."""
    text = completion.strip()
    if not text:
        return 0.0
    letters = set(problem.answer.replace("-", ""))
    hits = sum(1 for i, c in enumerate(text) if (c == "-" if i % 2 else c in letters))
    return hits / max(len(text), len(problem.answer))


@register_domain(
    "style", verify=style_measure, rule_reward=False,
    description="style:WORD= -> a styled answer (letters of WORD, dash-separated); rewarded by a judge or reward model",
)
def style(rng: random.Random, difficulty: int) -> tuple[str, str]:
    """A domain with no rule-based training reward: what is rewarded is a style, as a judge or a reward model
    sees it. The reference (the letters of WORD in order, dash-separated) is one well-styled answer, for SFT and
    for judges trained on it; the held-out score is `style_measure`."""
    word = _word(rng, difficulty)
    return f"style:{word}=", "-".join(word)
