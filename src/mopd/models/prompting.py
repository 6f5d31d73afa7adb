"""How a prompt becomes the token ids a model is conditioned on: the one function every stage uses.

Sampling, supervised batches and evaluation all call `prompt_token_ids`, so a model is trained on exactly the
rendering it is sampled and scored with. Two renderings:

* raw (the tiny character tokenizer, and any tokenizer when the recipe says `chat_template: none`):
  `[BOS] + tokens(prompt)`, BOS left out when the tokenizer has none (e.g. Qwen);
* chat: `apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, **kwargs)`,
  which ends where the assistant's reply starts; the completion then ends with the tokenizer's EOS token
  (for chat models this is the end-of-turn token, e.g. `<|im_end|>` for Qwen3).

The choice is stored on the tokenizer object (`set_prompt_format`), because the tokenizer is what every
rendering site already receives: the choice cannot differ between sampling, SFT and evaluation, and no
signature below the runner needs a new argument. A tokenizer nobody configured renders raw, as before.
"""

from __future__ import annotations

from typing import Any

_ATTR = "_mopd_prompt_format"  # (use_chat_template, apply_chat_template kwargs)


def set_prompt_format(tokenizer, mode: str = "auto", template_kwargs: dict[str, Any] | None = None):
    """Fix how `tokenizer` renders prompts; `mode` is `auto` (chat template if the tokenizer has one) or `none`.

    Also gives a tokenizer without a pad token its EOS as pad (padding positions are masked out everywhere).
    Returns the tokenizer.
    """
    if mode not in ("auto", "none"):
        raise ValueError(f"chat_template must be auto or none, got {mode!r}")
    use = mode == "auto" and bool(getattr(tokenizer, "chat_template", None))
    setattr(tokenizer, _ATTR, (use, dict(template_kwargs or {})))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, _ATTR, (False, {}))[0])


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The ids the model sees before its completion (see the module docstring for the two renderings)."""
    use, kwargs = getattr(tokenizer, _ATTR, (False, {}))
    if use:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, **kwargs
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [*bos, *tokenizer(prompt, add_special_tokens=False).input_ids]
