"""The one forward pass every stage uses, so sampling and training see identical positions.

Rows are left-padded prompts followed by right-padded completions; position ids therefore count real tokens
only (cumsum of the attention mask), which makes a row's logits independent of how much padding it got.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..core.logprobs import upcast


def position_ids_from_mask(attention_mask_B_T: torch.Tensor) -> torch.Tensor:
    return (attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)


def accepts(model, argument: str) -> bool:
    """Whether `model.forward` takes `argument` (HF causal LMs take `logits_to_keep`; other backends may not).

    A peft wrapper's forward takes `**kwargs` and hands them to the model it wraps, so that model's signature
    decides: without this a LoRA student would project every position onto the vocabulary.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters


def kv_cache(model) -> dict[str, DynamicCache]:
    """The keyword argument that hands `model` one `DynamicCache`, created here and filled in place by each call.

    Why: transformers 5 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in
    5.40), and reading `out.past_key_values` back warns too. Creating the cache up front (as the model itself
    would, from its config) and passing it under whichever name this transformers' forward takes needs neither,
    and works from the lowest transformers pyproject allows to the newest.
    """
    name = "cache" if accepts(model, "cache") else "past_key_values"
    return {name: DynamicCache(config=model.config)}


def sequence_logits(
    model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, logits_to_keep: int = 0
) -> torch.Tensor:
    """Logits [B, T, V] in float32 (float64 for a float64 model); logits[:, t] predict token t + 1.

    `logits_to_keep > 0` returns only the last `logits_to_keep` positions, [B, K, V]: the backbone still runs
    over every position, but the vocabulary projection (and the float32 copy) skips the prompt, which for a
    real vocabulary is most of a scoring pass's memory.
    """
    keep = {"logits_to_keep": logits_to_keep} if logits_to_keep and accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=position_ids_from_mask(attention_mask_B_T),
        use_cache=False,
        **keep,
    )
    logits = out.logits if keep or not logits_to_keep else out.logits[:, -logits_to_keep:]
    return upcast(logits)


# Architectures whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)`, plus a final
# elementwise map of the logits for the ones that have it (read from their config). Anything else is scored by
# its own forward (`final_hidden` returns its logits as the "hidden states" with an identity head): correct,
# but without the memory saving of a split head, rather than silently wrong for a forward we have not read.
PLAIN_HEADS = frozenset({"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "gemma"})


def _softcap(cfg) -> Callable[[torch.Tensor], torch.Tensor] | None:
    cap = getattr(cfg, "final_logit_softcapping", None)
    return None if cap is None else (lambda x: torch.tanh(x / cap) * cap)  # Gemma 2/3: cap * tanh(x / cap)


FINAL_MAPS: dict[str, Callable[[object], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "gemma2": _softcap,
    "gemma3_text": _softcap,
    "cohere": lambda cfg: (lambda x: x * cfg.logit_scale),
    "granite": lambda cfg: (lambda x: x / cfg.logits_scaling),
}


@dataclass(frozen=True)
class LogitHead:
    """hidden states [..., H] -> float32 logits [..., V]: the model's output projection and its final map.

    Why a separate head: the vocabulary projection is what makes logits big ([B, T, V] at V = 151,936), so a
    caller that applies it a block of positions at a time (`learner.chunked`) never holds every position's
    logits. `projection` is the model's own output-embedding module (tied to the input embedding or not, a
    LoRA-wrapped one included), so gradients reach its parameters as in the model's forward. `projection` None:
    the "hidden states" already are logits (a model `final_hidden` cannot split).
    """

    projection: torch.nn.Module | None
    final_map: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.projection is None:
            return upcast(hidden)
        # a block of positions is a strided slice of the hidden states; contiguous, its projection is one GEMM
        # (strided, it goes through a batched matmul over a broadcast weight: 1.3x slower at Qwen3's vocabulary)
        logits = self.projection(hidden.contiguous())
        if self.final_map is not None:
            logits = self.final_map(logits)
        return upcast(logits)


def plain_weight(head: LogitHead | None) -> torch.Tensor | None:
    """The [V, H] weight of a head that is one bias-free linear map in float32 or float64, outside autocast (so
    its logits are exactly `hidden @ weight.T` and a caller may project a block of vocabulary columns at a time),
    else None."""
    p = None if head is None else head.projection
    if type(p) is not torch.nn.Linear or p.bias is not None or head is None or head.final_map is not None:
        return None
    w = p.weight
    ok = w.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(w.device.type)
    return w if ok else None


def split_head(model) -> tuple[torch.nn.Module, LogitHead] | None:
    """(decoder, head) of an HF causal LM whose forward is `final_map(lm_head(decoder(...)))`, else None.

    A peft wrapper is looked through (`get_base_model()`: the HF model with its adapters injected in place), so
    a LoRA student's decoder and head are the adapted ones.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in PLAIN_HEADS and model_type not in FINAL_MAPS:
        return None
    decoder = getattr(inner, "model", None)
    projection = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(decoder, torch.nn.Module) or projection is None:
        return None
    final_map = FINAL_MAPS[model_type](inner.config) if model_type in FINAL_MAPS else None
    return decoder, LogitHead(projection, final_map)


def final_hidden(
    model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, keep: int = 0
) -> tuple[torch.Tensor, LogitHead]:
    """The final hidden states of the last `keep` positions ([B, K, H]; every position when 0) and the head
    that turns them into the logits `sequence_logits` would return: head(hidden) == sequence_logits(..., keep).

    Same positions and ids as `sequence_logits` (it is that forward without its last projection), so the one
    block `head(hidden)` is the very computation `sequence_logits` does. A model `split_head` does not know
    returns its logits and an identity head.
    """
    split = split_head(model)
    if split is None:
        return sequence_logits(model, input_ids_B_T, attention_mask_B_T, logits_to_keep=keep), LogitHead(None)
    decoder, head = split
    out = decoder(
        input_ids=input_ids_B_T,
        attention_mask=attention_mask_B_T,
        position_ids=position_ids_from_mask(attention_mask_B_T),
        use_cache=False,
    )
    hidden = out.last_hidden_state
    return (hidden[:, -keep:, :] if keep else hidden), head


def shared_prompt_hidden(
    model, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor, prompt_columns: int, keep: int
) -> tuple[torch.Tensor, LogitHead] | None:
    """`final_hidden(model, ..., keep)` with each distinct prompt (the first `prompt_columns` columns) run once:
    its KV cache is copied to every row that shares it, and only the completion columns run per row.

    Why: the G rollouts of one prompt share it, and a teacher scoring them would otherwise run its decoder over
    the prompt G times; with long prompts that is most of a scoring pass. The same hidden states up to float
    rounding (attention over a cache is another kernel than over the whole row). None when it does not apply:
    no prompt repeats, a model `split_head` does not know, or `keep` reaching into the prompt past its last
    column.
    """
    split = split_head(model)
    B, T = input_ids_B_T.shape
    if split is None or not 0 < prompt_columns < T or keep > T - prompt_columns + 1:
        return None
    prompts, inverse = torch.unique(input_ids_B_T[:, :prompt_columns] * attention_mask_B_T[:, :prompt_columns]
                                    + (attention_mask_B_T[:, :prompt_columns] - 1), dim=0, return_inverse=True)
    if prompts.shape[0] == B:
        return None
    decoder, head = split
    first_row: dict[int, int] = {}  # a row of each distinct prompt
    for row, which in enumerate(inverse.tolist()):
        first_row.setdefault(which, row)
    first = torch.tensor([first_row[u] for u in range(prompts.shape[0])], device=input_ids_B_T.device)
    positions = position_ids_from_mask(attention_mask_B_T)
    cache = kv_cache(decoder)
    pre = decoder(input_ids=input_ids_B_T[first, :prompt_columns],
                  attention_mask=attention_mask_B_T[first, :prompt_columns],
                  position_ids=positions[first, :prompt_columns], use_cache=True, **cache).last_hidden_state
    next(iter(cache.values())).batch_select_indices(inverse)
    rest = decoder(input_ids=input_ids_B_T[:, prompt_columns:], attention_mask=attention_mask_B_T,
                   position_ids=positions[:, prompt_columns:], use_cache=True, **cache).last_hidden_state
    hidden = torch.cat([pre[inverse, -1:], rest], dim=1)
    return hidden[:, -keep:], head
