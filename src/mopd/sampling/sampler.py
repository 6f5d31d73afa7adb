"""Batched, KV-cached sampling with temperature and top-p that records the sampler's per-token logprobs.

The recorded logprob is that of the distribution the token was actually drawn from (after temperature and
top-p), which is what importance-sampling correction needs; with temperature 1 and top_p 1 it equals the
policy's own logprob at sampling time.

No work on padding and no prompt recomputed (issue 17): each distinct prompt is prefilled once and its KV cache
copied to its G samples (`shared_prefill_rows`), and rows that emitted EOS leave the decode batch
(`decode_rows`); the draw itself still runs over every row, so the generator's stream, and with it every token,
is the one decoding every row gives. tests/test_padding_prefill.py compares both with that reference.
"""

from __future__ import annotations

import torch

from ..core.batch import RolloutBatch, rollout_batch
from ..models.forward import accepts, kv_cache, position_ids_from_mask
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


def completion_text(tokenizer, ids: list[int]) -> str:
    """The text of completion tokens as the model wrote it, which is what verifiers and episodes read.

    Why not `tokenizer.decode(ids)` alone: it applies `clean_up_tokenization_spaces` when the tokenizer's config
    turns it on (Llama 3's does; transformers 5 keeps it for tokenizers other than BPE, earlier versions for all),
    and that rewrites the text: "a , b ." becomes "a, b.", "it 's" becomes "it's", so an answer or a program's
    string literal would be judged as something the model did not write."""
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def filter_top_p(logprobs_B_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p; renormalize."""
    sorted_lp, order = logprobs_B_V.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop_sorted = mass_before >= top_p  # the first token is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logprobs_B_V.masked_fill(drop, float("-inf")).log_softmax(-1)


# From this many tokens on, a draw is one uniform per row through the CDF (`cdf_draw`) instead of
# `torch.multinomial`, which draws V exponentials per row: at Qwen3's 151,936 tokens those were two thirds of the
# sampler's time on a CPU (benchmarks/real_shape.py). Below it (every bundled testbed's vocabulary) the draw is
# multinomial's, which every recorded number used.
CDF_DRAW_MIN_VOCAB = 4096
CDF_BLOCK = 256  # tokens per block of the two-level CDF


def cdf_draw(probs_B_V: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row, drawn with probability probs / sum(probs), from one uniform u per row: the block of
    `CDF_BLOCK` tokens whose cumulative mass first exceeds u * total, then the token within it likewise. A token
    of zero mass is never drawn.

    Why two levels: a cumulative sum over the whole vocabulary is a sequential pass (and wants float64 to keep
    tail tokens' mass), which at 151,936 tokens cost more than the model's step; block sums are one vectorized
    pass, and the float64 cumulative sums run over the block sums and one block per row.
    """
    B, V = probs_B_V.shape
    full = V // CDF_BLOCK * CDF_BLOCK
    sums = [probs_B_V[:, :full].reshape(B, -1, CDF_BLOCK).sum(-1)] if full else []
    if full < V:
        sums.append(probs_B_V[:, full:].sum(-1, keepdim=True))
    cum_B_N = torch.cat(sums, dim=1).double().cumsum(-1)
    u_B_1 = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=probs_B_V.device)
    target_B_1 = u_B_1 * cum_B_N[:, -1:]
    block_B_1 = torch.searchsorted(cum_B_N, target_B_1, right=True).clamp(max=cum_B_N.shape[1] - 1)
    before_B_1 = torch.where(block_B_1 > 0, cum_B_N.gather(1, (block_B_1 - 1).clamp(min=0)), 0.0)
    mass_B_1 = cum_B_N.gather(1, block_B_1) - before_B_1
    ids_B_C = block_B_1 * CDF_BLOCK + torch.arange(CDF_BLOCK, device=probs_B_V.device)
    inside_B_C = probs_B_V.gather(1, ids_B_C.clamp(max=V - 1)).double() * (ids_B_C < V)
    inner_B_C = inside_B_C.cumsum(-1)
    # where u falls within its block, as a fraction of the block's mass (its own float64 sum, not the block sum's)
    frac_B_1 = ((target_B_1 - before_B_1) / mass_B_1.clamp(min=torch.finfo(torch.float64).tiny)).clamp(0.0, 1.0)
    pos_B_1 = torch.searchsorted(inner_B_C, frac_B_1 * inner_B_C[:, -1:], right=True)
    last_B_1 = ((inside_B_C > 0) * torch.arange(CDF_BLOCK, device=probs_B_V.device)).amax(-1, keepdim=True)
    return (block_B_1 * CDF_BLOCK + torch.minimum(pos_B_1, last_B_1)).squeeze(-1)  # frac 1: its last token


def next_tokens(logits_B_V: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's next token and its logprob under the tempered, top-p filtered distribution it was drawn from;
    greedy (logprob 0) at temperature 0."""
    if temperature == 0:  # argmax of the logits is that of the log-softmax: no [B, V] normalisation
        return logits_B_V.argmax(-1), torch.zeros(logits_B_V.shape[0], device=logits_B_V.device)
    dist_lp = (logits_B_V if temperature == 1.0 else logits_B_V / temperature).log_softmax(-1)
    if top_p < 1.0:
        dist_lp = filter_top_p(dist_lp, top_p)
    if dist_lp.shape[-1] >= CDF_DRAW_MIN_VOCAB:
        tok = cdf_draw(dist_lp.exp(), generator)
    else:
        tok = torch.multinomial(dist_lp.exp(), 1, generator=generator).squeeze(-1)
    return tok, dist_lp.gather(-1, tok[:, None]).squeeze(-1)


def next_tokens_by_group(logits_B_V: torch.Tensor, temperature: float, top_p: float,
                         draws: list[tuple[int, torch.Generator | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_tokens` for consecutive row groups, each drawn from its own generator: `draws` is (rows, generator)
    per group, in row order. A group's tokens then depend on its logits and its generator only, whatever other
    groups share the batch (batched sampling of independently seeded groups: `sampling.grouped`)."""
    parts, start = [], 0
    for rows, generator in draws:
        parts.append(next_tokens(logits_B_V[start:start + rows], temperature, top_p, generator))
        start += rows
    return torch.cat([tok for tok, _ in parts]), torch.cat([lp for _, lp in parts])


def on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` itself on its own device; on another device, a generator there seeded from it.

    Why: `torch.multinomial` needs a generator on the probabilities' device, while stages derive a CPU
    generator from (seed, step); seeding from it keeps an accelerator run deterministic in (seed, step) too.
    """
    if generator is None or generator.device == device or device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


# Fewer rows than this in one forward and the float32 GEMM may take other kernels (on one development machine
# 1-3, 5-7 and 9-11 rows rounded differently from 4, 8 and 12 or more; which counts do is the BLAS's choice and
# differs by CPU), so a row's logits could depend on how many rows share its forward. The shared prefill and the
# shrinking decode batch never go below it, so on a given machine they take the kernels decoding the whole batch
# takes. Across machines nothing is promised bit for bit: tests/test_padding_prefill.py checks the tokens exactly
# and the logprobs to a derived rounding bound, on a float64 model.
MIN_ROWS = 16


def shared_prefill_rows(prompts: list[str]) -> tuple[list[int], list[int]]:
    """(the batch rows to prefill, each batch row's position among them): each distinct prompt once.

    Why: a group's G samples share one prompt, so its prefill is computed once and its KV cache expanded G times.
    Rows of repeated prompts are added back up to `MIN_ROWS` rows (the prefill's last-position vocabulary
    projection is a GEMM of that many rows); when every prompt is distinct this is every row, in order.
    """
    first: dict[str, int] = {}
    chosen: list[int] = []
    inverse: list[int] = []
    for i, prompt in enumerate(prompts):
        if prompt not in first:
            first[prompt] = len(chosen)
            chosen.append(i)
        inverse.append(first[prompt])
    picked = set(chosen)
    chosen += [i for i in range(len(prompts)) if i not in picked][: max(0, MIN_ROWS - len(chosen))]
    return chosen, inverse


def decode_rows(rows: torch.Tensor, finished: torch.Tensor, cache) -> torch.Tensor:
    """The batch rows the next decode step computes: `rows` minus finished ones, once a quarter of them finished.

    A finished row's remaining tokens are padding, so computing them is waste; dropping rows reindexes the KV cache
    (a copy), hence only when a quarter of the decode batch finished (a few copies per batch), and never below
    `MIN_ROWS` rows (finished rows fill up to it, computed and ignored as before).
    """
    live = ~finished[rows]
    n_live = int(live.sum())
    if rows.numel() <= MIN_ROWS or 4 * n_live > 3 * rows.numel():
        return rows
    fill = (~live).nonzero().flatten()[: max(0, MIN_ROWS - n_live)]
    keep = torch.cat([live.nonzero().flatten(), fill]).sort().values
    cache.batch_select_indices(keep)
    return rows[keep]


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
    draw_groups: list[tuple[int, torch.Generator]] | None = None,
) -> RolloutBatch:
    """Sample one completion per prompt (repeat prompts for groups). temperature 0 means greedy. `draw_groups`
    (instead of `generator`): consecutive row groups, (rows, generator) each, every group's tokens drawn from its
    own generator (`next_tokens_by_group`)."""
    return _sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   generator=generator, domains=domains, group_ids=group_ids, references=references,
                   prompt_format=prompt_format, draw_groups=draw_groups)


@torch.no_grad()
def _sample(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
    generator: torch.Generator | None, domains: list[str] | None, group_ids: list[int] | None,
    references: list[str] | None, prompt_format: PromptFormat, share_prefill: bool = True,
    drop_finished: bool = True, draw_groups: list[tuple[int, torch.Generator]] | None = None,
) -> RolloutBatch:
    """`sample`; `share_prefill` / `drop_finished` False: prefill and decode every row (the reference the tests
    compare the shared prefill and the shrinking decode batch with)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device  # the batch lives where the model does (cpu or an accelerator)
    prompt_ids, prompt_mask = (x.to(dev) for x in encode_prompts(tokenizer, prompts, prompt_format))
    generator = on_device(generator, dev)
    B = prompt_ids.shape[0]
    draws = None if draw_groups is None else [(n, on_device(g, dev)) for n, g in draw_groups]
    if draws is not None and sum(n for n, _ in draws) != B:
        raise ValueError(f"draw_groups cover {sum(n for n, _ in draws)} rows of {B}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    new_ids = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    new_lp = torch.zeros((B, max_new_tokens), device=dev)
    new_mask = torch.zeros((B, max_new_tokens), device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)

    # One preallocated [B, P + N] attention mask whose growing prefix each decode step reads, instead of a
    # torch.cat per token; and logits for the last position only (`logits_to_keep=1`): the prefill would
    # otherwise project every prompt position onto the vocabulary, [B, P, V], to use one column of it.
    P = prompt_ids.shape[1]
    keep_last = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    cache = kv_cache(model)
    kv = next(iter(cache.values()))
    full_mask = torch.cat([prompt_mask, torch.zeros((B, max_new_tokens), dtype=torch.long, device=dev)], dim=1)
    chosen, inverse = shared_prefill_rows(prompts) if share_prefill else (list(range(B)), list(range(B)))
    shared = len(chosen) < B
    pre = torch.tensor(chosen, device=dev) if shared else slice(None)
    out = model(
        input_ids=prompt_ids[pre],
        attention_mask=prompt_mask[pre],
        position_ids=position_ids_from_mask(prompt_mask[pre]),
        use_cache=True,
        **cache,
        **keep_last,
    )
    logits = out.logits[:, -1].float()  # [B, V]: each row's next-token logits (a finished row's stay stale)
    if shared:  # each row's copy of its prompt's cache and logits
        expand = torch.tensor(inverse, device=dev)
        kv.batch_select_indices(expand)
        logits = logits[expand]
    next_pos = prompt_mask.sum(-1, keepdim=True)  # [B, 1] position of the next token
    rows = torch.arange(B, device=dev)  # the batch rows the decode batch (and the cache) holds, in its order
    steps = 0
    for t in range(max_new_tokens):
        # Sampled over all B rows, finished ones included: the draws use the generator as decoding every row
        # did, so the shrinking decode batch changes no live row's token.
        tok, tok_lp = (next_tokens(logits, temperature, top_p, generator) if draws is None
                       else next_tokens_by_group(logits, temperature, top_p, draws))
        live = ~finished
        new_ids[:, t] = tok.masked_fill(finished, pad)
        new_lp[:, t] = tok_lp.masked_fill(finished, 0.0)
        new_mask[:, t] = live.float()
        finished |= tok == eos
        steps = t + 1
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        full_mask[:, P + t] = live.long()
        if drop_finished:
            rows = decode_rows(rows, finished, kv)
        out = model(
            input_ids=new_ids[rows, t : t + 1],
            attention_mask=full_mask[rows, : P + t + 1],
            position_ids=next_pos[rows],
            use_cache=True,
            **cache,
            **keep_last,
        )
        next_pos = next_pos + 1
        logits[rows] = out.logits[:, -1].float()
    if was_training:
        model.train()

    new_ids, new_lp, new_mask = new_ids[:, :steps], new_lp[:, :steps], new_mask[:, :steps]
    completions = [
        completion_text(tokenizer, [i for i, m in zip(row.tolist(), mrow.tolist(), strict=True) if m and i != eos])
        for row, mrow in zip(new_ids, new_mask, strict=True)
    ]
    return rollout_batch(prompt_ids, prompt_mask, new_ids, new_lp, new_mask, prompts=prompts,
                         completions=completions, domains=domains, group_ids=group_ids, references=references)
