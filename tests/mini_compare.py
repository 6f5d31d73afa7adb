"""A miniature comparison recipe (two domains, a few steps per stage) shared by the baseline, round and compare
tests; tests add the stages they need to HEAD."""

from __future__ import annotations

import textwrap

HEAD = textwrap.dedent(
    """\
    name: minicmp
    seed: 0
    domains: [reversal, sorting]
    eval: {size: 8, max_new_tokens: 8}
    stages:
      base:
        kind: pretrain
        model: {hidden_size: 32, layers: 1, heads: 2, kv_heads: 1, intermediate_size: 64}
        steps: 4
        batch_size: 12
      sft: {kind: sft, init: base, steps: 2, batch_size: 12}
      teacher_rev: {kind: rlvr, init: sft, domains: [reversal], steps: 4, batch_size: 2, group_size: 4, keep_every: 2}
      teacher_sort: {kind: rlvr, init: sft, domains: [sorting], steps: 4, batch_size: 2, group_size: 4, keep_every: 2}
    """
)


def recipe(extra_stages: str, tail: str = "") -> str:
    """HEAD plus stages (indented YAML under `stages:`) plus top-level blocks such as `compare:`."""
    return HEAD + textwrap.indent(textwrap.dedent(extra_stages), "  ") + textwrap.dedent(tail)
