"""Batched, KV-cached sampling with temperature and top-p that records the sampler's per-token logprobs.

The recorded logprob is that of the distribution the token was actually drawn from (after temperature and
top-p), which is what importance-sampling correction needs; with temperature 1 and top_p 1 it equals the
policy's own logprob at sampling time.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..core.batch import RolloutBatch, rollout_batch
from ..models.forward import accepts, position_ids_from_mask
from ..models.prompting import RAW, PromptFormat


def encode_prompts(
    tokenizer, prompts: list[str], prompt_format: PromptFormat = RAW
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids (rendered by `prompt_format`: `[BOS] prompt` or the chat template) and mask."""
    ids = [prompt_format.token_ids(tokenizer, p) for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return input_ids, mask


def _filter_top_p(logprobs_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p; renormalize."""
    sorted_lp, order = logprobs_B_V.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p  # the first token is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs_B_V.masked_fill(drop, float("-inf")).log_softmax(-1)


def on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` itself on its own device; on another device, a generator there seeded from it.

    Why: `torch.multinomial` needs a generator on the probabilities' device, while stages derive a CPU
    generator from (seed, step); seeding from it keeps an accelerator run deterministic in (seed, step) too.
    """
    if generator is None or generator.device == device or device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def kv_cache(model) -> dict[str, DynamicCache]:
    """The keyword argument that hands `model` one `DynamicCache`, created here and filled in place by each call.

    Why: transformers 5 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in
    5.40), and reading `out.past_key_values` back warns too. Creating the cache up front (as the model itself
    would, from its config) and passing it under whichever name this transformers' forward takes needs neither,
    and works from the lowest transformers pyproject allows to the newest.
    """
    name = "cache" if accepts(model, "cache") else "past_key_values"
    return {name: DynamicCache(config=model.config)}


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    domains: list[str] | None = None,
    group_ids: list[int] | None = None,
    references: list[str] | None = None,
    prompt_format: PromptFormat = RAW,
) -> RolloutBatch:
    """Sample one completion per prompt (repeat prompts for groups). temperature 0 means greedy."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device  # the batch lives where the model does (cpu or an accelerator)
    prompt_ids, prompt_mask = (x.to(dev) for x in encode_prompts(tokenizer, prompts, prompt_format))
    generator = on_device(generator, dev)
    B = prompt_ids.shape[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    new_ids = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    new_lp = torch.zeros((B, max_new_tokens), device=dev)
    new_mask = torch.zeros((B, max_new_tokens), device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    # One preallocated [B, P + N] attention mask whose growing prefix each decode step reads (a view), instead
    # of a torch.cat per token; and logits for the last position only (`logits_to_keep=1`): the prefill would
    # otherwise project every prompt position onto the vocabulary, [B, P, V], to use one column of it.
    P = prompt_ids.shape[1]
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    cache = kv_cache(model)
    full_mask = torch.cat([prompt_mask, torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)], dim=1)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        use_cache=True,
        **cache,
        **keep_last,
    )
    next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1] position of the next token
    logits = out.logits[:, -1].float()
    steps = 0
    for t in range(max_new_tokens):
        if temperature == 0:
            tok = logits.argmax(-1)  # argmax of the logits is that of the log-softmax: no [B, V] normalisation
            tok_lp = torch.zeros(B, device=dev)
        else:
            dist_lp = (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)
            if top_p < 1.0:
                dist_lp = _filter_top_p(dist_lp, top_p)
            tok = torch.multinomial(dist_lp.exp(), 1, generator=generator).squeeze(-1)
            tok_lp = dist_lp.gather(-1, tok[:, None]).squeeze(-1)
        live = ~finished
        new_ids[:, t] = tok.masked_fill(finished, pad)
        new_lp[:, t] = tok_lp.masked_fill(finished, 0.0)
        new_mask[:, t] = live.float()
        finished |= tok == eos
        steps = t + 1
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        full_mask[:, P + t] = live.long()
        out = model(
            input_ids=new_ids[:, t : t + 1],
            attention_mask=full_mask[:, : P + t + 1],
            position_ids=next_pos,
            use_cache=True,
            **cache,
            **keep_last,
        )
        next_pos = next_pos + 1
        logits = out.logits[:, -1].float()
    if was_training:
        model.train()

    new_ids, new_lp, new_mask = new_ids[:, :steps], new_lp[:, :steps], new_mask[:, :steps]
    completions = [
        tokenizer.decode([i for i, m in zip(row.tolist(), mrow.tolist(), strict=True) if m and i != eos])
        for row, mrow in zip(new_ids, new_mask, strict=True)
    ]
    return rollout_batch(prompt_ids, prompt_mask, new_ids, new_lp, new_mask, prompts=prompts,
                         completions=completions, domains=domains, group_ids=group_ids, references=references)
