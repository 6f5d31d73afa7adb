"""How a prompt becomes the token ids a model is conditioned on: one `PromptFormat` per stage, passed down.

Sampling, supervised batches and evaluation all render through `PromptFormat.token_ids`, and a stage resolves
its format once (`execution.resolve`) and hands the same object to each of them, so a model is trained on exactly
the rendering it is sampled and scored with. Two renderings:

* raw (the tiny character tokenizer, and any tokenizer when the recipe says `chat_template: none`):
  `[BOS] + tokens(prompt)`, BOS left out when the tokenizer has none (e.g. Qwen);
* chat: `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, **kwargs)`,
  which ends where the assistant's reply starts; the completion then ends with the tokenizer's EOS token
  (for chat models this is the end-of-turn token, e.g. `<|im_end|>` for Qwen3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PromptContext:
    """What a prompted teacher sees before each prompt: a system prompt and worked examples (few-shot turns).

    Why: a model conditioned on an instruction and examples is often a better teacher of a narrow task than the
    same weights without them, at no training cost; distilling it into the bare model on the student's own
    rollouts is context distillation. Chat rendering: the system message, then each example as a user turn and
    an assistant turn, then the prompt. Raw rendering: the system text, each example's prompt and answer, then
    the prompt, joined by single spaces (the character tokenizer has no newline)."""

    system: str | None = None
    examples: tuple[tuple[str, str], ...] = ()

    def messages(self, prompt: str) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for user, answer in self.examples:
            turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return [*turns, {"role": "user", "content": prompt}]

    def raw_text(self, prompt: str) -> str:
        parts = [self.system] if self.system else []
        parts += [f"{user}{answer}" for user, answer in self.examples]
        return " ".join([*parts, prompt])


@dataclass(frozen=True)
class PromptFormat:
    """Raw (`chat_template=False`, the default) or the tokenizer's chat template with `template_kwargs`; a
    prompted teacher's `context` goes before every prompt."""

    chat_template: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    context: PromptContext | None = None

    def token_ids(self, tokenizer, prompt: str) -> list[int]:
        """The ids the model sees before its completion (see the module docstring for the two renderings)."""
        ctx = self.context or PromptContext()
        if self.chat_template:
            ids = tokenizer.apply_chat_template(
                ctx.messages(prompt), add_generation_prompt=True, tokenize=True, **self.template_kwargs,
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [*bos, *tokenizer(ctx.raw_text(prompt), add_special_tokens=False).input_ids]

    def with_context(self, context: PromptContext | None) -> PromptFormat:
        return PromptFormat(self.chat_template, dict(self.template_kwargs), context)


RAW = PromptFormat()


def prompt_format(tokenizer, mode: str = "auto", template_kwargs: dict[str, Any] | None = None) -> PromptFormat:
    """The format a recipe's `chat_template` (`auto`: the chat template if the tokenizer has one; `none`) gives
    prompts for `tokenizer`."""
    if mode not in ("auto", "none"):
        raise ValueError(f"chat_template must be auto or none, got {mode!r}")
    use = mode == "auto" and bool(getattr(tokenizer, "chat_template", None))
    return PromptFormat(chat_template=use, template_kwargs=dict(template_kwargs or {}))


def with_pad_token(tokenizer):
    """`tokenizer`, given its EOS as pad token when it has none (padding positions are masked out everywhere)."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Rendering:
    """A recipe's `chat_template` and `chat_template_kwargs`: the `PromptFormat` each tokenizer gets from them."""

    mode: str
    template_kwargs: dict[str, Any] = field(hash=False)

    def format_for(self, tokenizer) -> PromptFormat:
        return prompt_format(tokenizer, self.mode, self.template_kwargs)


TEACHER_PROMPT_FILE = "teacher_prompt.json"  # a prompted teacher's checkpoint: its system prompt and examples


def write_teacher_prompt(directory, context: PromptContext) -> None:
    data = {"system": context.system, "examples": [{"prompt": p, "answer": a} for p, a in context.examples]}
    (Path(directory) / TEACHER_PROMPT_FILE).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_teacher_prompt(directory) -> PromptContext | None:
    """A checkpoint's prompted-teacher context, or None for an ordinary checkpoint (or a Hub id)."""
    path = Path(str(directory)) / TEACHER_PROMPT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return PromptContext(data.get("system"), tuple((e["prompt"], e["answer"]) for e in data.get("examples", [])))
