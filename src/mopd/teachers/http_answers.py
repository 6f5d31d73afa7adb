"""A served teacher's answer, read and checked before any number of it is used.

Why check: a server that returns positive logprobs, skips a position, scores other token ids or sends NaN gives
a run that exits 0 with nonsense (a normalized score of 2.6 from logprobs of +3.0), or fails later with a
`KeyError` or a NaN loss blamed on the learning rate. Every answer is read into one form, `RowScores`, and each
rule below is one `BadAnswer` line naming the row, the position and what was wrong (the caller adds the stage,
teacher and URL):
- one entry per token sent (the first token has none: nothing predicts it);
- each entry scores the token sent at that position;
- logprobs are finite and <= 0 (log-softmax is x - logsumexp(x) <= 0 for any rounding that is monotone, so no
  slack is needed);
- the top-k is sorted from the most likely down and its probability mass is at most 1 + MASS_SLACK.

The two wire formats:
- vLLM (`api: openai`): `choices[i].prompt_logprobs`, per position null (first) or `{id: {logprob, rank,
  decoded_token}}` holding the token sent and the k best.
- SGLang (`api: sglang`, its native `/generate`): one result per prompt, `meta_info.input_token_logprobs` =
  `[[logprob, id, text], ...]` with a null logprob first, and `meta_info.input_top_logprobs` = `[null, [[logprob,
  id, text], ...], ...]` when `top_logprobs_num` > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# float32 logprobs of a logsumexp up to ~100 are each within ~1e-5 of exact, so k of them sum to within ~k * 1e-5 of
# their true mass (<= 1); 1e-3 leaves a margin of 100 at k = 1, and a server off by e^3 is caught either way
MASS_SLACK = 1e-3


class BadAnswer(ValueError):
    """One line: what was wrong with the answer, where."""


@dataclass
class RowScores:
    """One row's scores: `sampled[j]` = log p(token j | tokens < j) for j >= 1 (index 0 unused), `top[j]` = the k best
    (id, logprob) pairs, most likely first (empty when k was 0)."""

    sampled: list[float]
    top: list[list[tuple[int, float]]]


def _logprob(value, row: int, j: int, token: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadAnswer(f"row {row}, position {j} (token {token}): logprob {value!r} is not a number")
    if not math.isfinite(value):
        raise BadAnswer(f"row {row}, position {j} (token {token}): logprob {value} is not finite")
    if value > 0:
        raise BadAnswer(f"row {row}, position {j} (token {token}): logprob {value:+g} > 0 (a logprob is never "
                        "positive)")
    return float(value)


def _top(pairs: list[tuple[int, float]], k: int, row: int, j: int) -> list[tuple[int, float]]:
    """The k best of `pairs`, checked: sorted as sent (SGLang) or by value (vLLM's dict), mass <= 1."""
    lps = [lp for _, lp in pairs]
    if any(a < b for a, b in zip(lps, lps[1:], strict=False)):
        raise BadAnswer(f"row {row}, position {j}: the top-{k} logprobs are not sorted from the most likely down")
    mass = sum(math.exp(lp) for _, lp in pairs[:k])
    if mass > 1 + MASS_SLACK:
        raise BadAnswer(f"row {row}, position {j}: the top-{k} probabilities add up to {mass:.4g} > 1")
    if len({t for t, _ in pairs[:k]}) < len(pairs[:k]):
        raise BadAnswer(f"row {row}, position {j}: a token appears twice in the top-{k}")
    return pairs[:k]


def _count(got: int, ids: list[int], row: int) -> None:
    if got != len(ids):
        raise BadAnswer(f"row {row}: {got} logprob entries for {len(ids)} tokens sent (one per token expected)")


def read_vllm(choices, prompts: list[list[int]], k: int) -> list[RowScores]:
    """vLLM's `choices` (any order; matched by `index`) for `prompts`, checked."""
    if not isinstance(choices, list) or len(choices) != len(prompts):
        raise BadAnswer(f"{len(choices) if isinstance(choices, list) else 'no'} choices for {len(prompts)} prompts")
    try:
        by_index = sorted(choices, key=lambda c: c["index"])
    except (KeyError, TypeError):
        raise BadAnswer("a choice has no `index`") from None
    out = []
    for row, (choice, ids) in enumerate(zip(by_index, prompts, strict=True)):
        lps = choice.get("prompt_logprobs") if isinstance(choice, dict) else None
        if not isinstance(lps, list):
            raise BadAnswer(f"row {row}: no prompt_logprobs (the server must support vLLM's `prompt_logprobs`; "
                            "for SGLang, set api: sglang)")
        _count(len(lps), ids, row)
        sampled, top = [0.0], [[]]
        for j in range(1, len(ids)):
            entries = lps[j]
            if not isinstance(entries, dict):
                raise BadAnswer(f"row {row}, position {j}: no entry (null where a logprob was expected)")
            mine = entries.get(str(ids[j]))
            if not isinstance(mine, dict):
                raise BadAnswer(f"row {row}, position {j}: no entry for token {ids[j]}, the token sent (it scored "
                                f"{sorted(entries)[:4]})")
            sampled.append(_logprob(mine.get("logprob"), row, j, ids[j]))
            pairs = []
            for t, e in entries.items():
                if not (isinstance(t, str) and t.lstrip("-").isdigit() and isinstance(e, dict)):
                    raise BadAnswer(f"row {row}, position {j}: an entry keyed {t!r} is not a token id")
                pairs.append((int(t), _logprob(e.get("logprob"), row, j, int(t))))
            pairs.sort(key=lambda p: -p[1])
            top.append(_top(pairs, k, row, j) if k else [])
        out.append(RowScores(sampled, top))
    return out


def _triple(entry, row: int, j: int) -> tuple[float | None, int]:
    if not (isinstance(entry, list | tuple) and len(entry) >= 2 and isinstance(entry[1], int)):
        raise BadAnswer(f"row {row}, position {j}: {entry!r} is not [logprob, token id, text]")
    return entry[0], entry[1]


def read_sglang(results, prompts: list[list[int]], k: int) -> list[RowScores]:
    """SGLang's `/generate` results (one per prompt, in order; a lone prompt may come back unwrapped), checked."""
    results = [results] if isinstance(results, dict) else results
    if not isinstance(results, list) or len(results) != len(prompts):
        raise BadAnswer(f"{len(results) if isinstance(results, list) else 'no'} results for {len(prompts)} prompts")
    out = []
    for row, (res, ids) in enumerate(zip(results, prompts, strict=True)):
        meta = res.get("meta_info") if isinstance(res, dict) else None
        tokens = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(tokens, list):
            raise BadAnswer(f"row {row}: no meta_info.input_token_logprobs (ask with return_logprob and "
                            "logprob_start_len 0)")
        _count(len(tokens), ids, row)
        tops = meta.get("input_top_logprobs") if k else None
        if k and not (isinstance(tops, list) and len(tops) == len(ids)):
            raise BadAnswer(f"row {row}: no input_top_logprobs with one entry per token (top_logprobs_num {k})")
        sampled, top = [0.0], [[]]
        for j in range(len(ids)):
            lp, token = _triple(tokens[j], row, j)
            if token != ids[j]:
                raise BadAnswer(f"row {row}, position {j}: scored token {token}, not {ids[j]}, the token sent")
            if j == 0:
                continue
            sampled.append(_logprob(lp, row, j, token))
            if k:
                if not isinstance(tops[j], list):
                    raise BadAnswer(f"row {row}, position {j}: no top logprobs")
                pairs = [(t, _logprob(v, row, j, t)) for v, t in (_triple(e, row, j) for e in tops[j])]
                top.append(_top(pairs, k, row, j))
            else:
                top.append([])
        out.append(RowScores(sampled, top))
    return out
