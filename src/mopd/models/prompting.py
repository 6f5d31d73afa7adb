"""How a prompt becomes the token ids a model is conditioned on: one `PromptFormat` per stage, passed down.

Sampling, supervised batches and evaluation all render through `PromptFormat.token_ids`, and a stage resolves
its format once (`recipe.resolve`) and hands the same object to each of them, so a model is trained on exactly
the rendering it is sampled and scored with. Two renderings:

* raw (the tiny character tokenizer, and any tokenizer when the recipe says `chat_template: none`):
  `[BOS] + tokens(prompt)`, BOS left out when the tokenizer has none (e.g. Qwen);
* chat: `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, **kwargs)`,
  which ends where the assistant's reply starts; the completion then ends with the tokenizer's EOS token
  (for chat models this is the end-of-turn token, e.g. `<|im_end|>` for Qwen3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptFormat:
    """Raw (`chat_template=False`, the default) or the tokenizer's chat template with `template_kwargs`."""

    chat_template: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def token_ids(self, tokenizer, prompt: str) -> list[int]:
        """The ids the model sees before its completion (see the module docstring for the two renderings)."""
        if self.chat_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                **self.template_kwargs,
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return [*bos, *tokenizer(prompt, add_special_tokens=False).input_ids]


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
