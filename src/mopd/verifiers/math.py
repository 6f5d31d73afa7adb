"""Math answer verifier built on ``math-verify`` (``pip install math-verify``).

``math_reward(completion, reference)`` is 1.0 when the completion's final answer is mathematically equal
to the reference, else 0.0:

* the answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``) in the completion; without
  one, math-verify's own extraction is used on the tail of the text: an explicit "final answer is ..."
  phrase if present, otherwise the last LaTeX expression or number;
* equivalence is math-verify's: numbers, fractions and decimals (``\\frac{1}{2}`` == ``0.5``), symbolic
  forms (``2\\sqrt{2}`` == ``\\sqrt{8}``), thousands separators (``1,000`` == ``1000``), units and ``\\text``
  stripped, percentages, sets, intervals, equations ``x = 5`` against ``5``.

It never raises on a bad completion (anything unexpected is 0.0). Speed and hangs: sympy can take a very
long time on adversarial answers such as ``10^{10^{10^{10}}}``, so answers containing a power with an
exponent above 1e5 or a factorial above 1e4 are scored 0.0 without being compared, the tail of a
long completion and the boxed content are length-capped, and math-verify's own timeouts are used
**when called from the main thread**. math-verify implements them with ``signal.alarm``, which Python only
allows in the main thread (and which replaces any SIGALRM timer the caller set), so in other threads
the calls run with ``timeout=None`` and the guards above are the only protection; run the reward in
worker processes if you need a hard time bound there.
"""

from __future__ import annotations

import functools
import math as _pymath
import threading
from typing import Any

__all__ = ["extract_boxed", "math_reward"]

_TAIL_CHARS = 4000
_MAX_ANSWER_CHARS = 500
_MAX_EXPONENT = 1e5
_MAX_FACTORIAL = 1e4
_MAX_NODES = 2000


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``), else None."""
    if not isinstance(text, str):
        return None
    starts = sorted([i for key in ("\\boxed", "\\fbox") for i in _find_all(text, key)], reverse=True)
    for start in starts:
        j = start + (6 if text.startswith("\\boxed", start) else 5)
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth = 0
            for k in range(j, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1 : k].strip()
            continue  # unbalanced (truncated): try an earlier box
        if j > start + 5 and j < len(text):  # "\boxed 5": a space, then one token
            token = text[j:].split(None, 1)[0].rstrip("$.,;")
            if token:
                return token
    return None


def _find_all(text: str, key: str):
    i = text.find(key)
    while i != -1:
        yield i
        i = text.find(key, i + 1)


def math_reward(completion: str, reference: str, *, timeout_s: int = 2) -> float:
    """1.0 if the completion's final answer equals ``reference`` (see module docstring), else 0.0."""
    if reference is None:
        return 0.0
    try:
        gold = _parse_reference(str(reference))
        if not gold:
            return 0.0
        pred = _parse_completion(completion, timeout_s)
        if not pred or any(_explosive(p) for p in pred):
            return 0.0
        from math_verify import verify

        return 1.0 if verify(list(gold), pred, timeout_seconds=_timeout(timeout_s)) else 0.0
    except Exception:
        return 0.0
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException
        if type(e).__name__ == "TimeoutException":
            return 0.0
        raise


def _timeout(timeout_s: int) -> int | None:
    # signal.alarm only works in the main thread; elsewhere math-verify must run without its timeout.
    if threading.current_thread() is threading.main_thread():
        return max(1, int(_pymath.ceil(timeout_s)))
    return None


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> tuple:
    """Parsed gold answer (cached: references repeat across a group of samples)."""
    from math_verify import parse

    ref = reference.strip()
    if not ref or len(ref) > _MAX_ANSWER_CHARS:
        return ()
    boxed = extract_boxed(ref)
    text = f"\\boxed{{{boxed if boxed is not None else ref}}}"
    parsed = parse(text, extraction_config=_configs(), parsing_timeout=_timeout(5))
    if not parsed:
        parsed = parse(ref, extraction_config=_configs(), parsing_timeout=_timeout(5))
    if any(_explosive(p) for p in parsed):
        return ()
    return tuple(parsed)


def _parse_completion(completion: Any, timeout_s: int) -> list:
    from math_verify import parse

    if not isinstance(completion, str) or not completion.strip():
        return []
    boxed = extract_boxed(completion)
    if boxed is not None:
        if not boxed or len(boxed) > _MAX_ANSWER_CHARS:
            return []
        text = f"\\boxed{{{boxed}}}"
    else:
        text = completion[-_TAIL_CHARS:]
    return parse(text, extraction_config=_configs(), parsing_timeout=_timeout(timeout_s))


def _explosive(expr: Any) -> bool:
    """True for sympy expressions that could make comparison take forever (huge powers/factorials)."""
    try:
        from sympy import Basic, Pow, factorial
        from sympy.matrices import MatrixBase

        if isinstance(expr, MatrixBase):
            return any(_explosive(e) for e in expr)
        if not isinstance(expr, Basic):
            return False
        for n, node in enumerate(_postorder(expr)):
            if n > _MAX_NODES:
                return True
            if isinstance(node, Pow) and node.exp.is_number:
                if abs(complex(node.exp.evalf(15))) > _MAX_EXPONENT:
                    return True
            elif (
                isinstance(node, factorial)
                and node.args[0].is_number
                and abs(complex(node.args[0].evalf(15))) > _MAX_FACTORIAL
            ):
                return True
        return False
    except Exception:
        return True


def _postorder(expr):
    # Children before parents, so an inner huge power is caught before an outer exponent is evaluated.
    for arg in expr.args:
        yield from _postorder(arg)
    yield expr
