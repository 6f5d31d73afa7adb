"""vLLM rollouts for policy stages (UNTESTED ON GPU: no GPU was available when this was written).

`VLLMSampler` is a drop-in for `sampling.sampler.sample`: called with the student model and the prompts, it
first copies the student's current weights into the engine (`load_weights` on the engine's model, the colocated
pattern of TRL and verl), then samples with `SamplingParams(logprobs=0)`, which returns the logprob of each
sampled token, and packs the result into the same `RolloutBatch` layout as the PyTorch sampler.

Departures and assumptions, stated because they are unverified here:
* the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with tensor parallelism 1, so weights
  are handed over in memory; multi-GPU sharded sync is not implemented;
* sampler logprobs should be those of the distribution actually sampled (after temperature and top-p), as the
  PyTorch sampler records; vLLM returns raw-model logprobs unless `logprobs_mode="processed_logprobs"` is
  supported, which is requested and silently skipped on older versions (then the importance-sampling correction
  sees slightly different behaviour logprobs at temperature != 1);
* randomness: each request gets a seed drawn from the step's generator, so a run is repeatable in (seed, step)
  on the same machine, but not token-identical to the PyTorch sampler;
* the in-process engine runs in the trainer's thread, where the stage's forward passes hold `torch.autocast`
  (mixed precision): the engine is built, synced and run with autocast off (`_outside_autocast`), and its prefix
  cache is reset after every weight sync, since cached prompt KV computed with the previous weights would
  otherwise be reused.
"""

from __future__ import annotations

import os

import torch

from ..core.batch import RolloutBatch, rollout_batch
from ..models.lora import is_lora, merged_copy
from ..models.prompting import RAW, PromptFormat
from .sampler import completion_text, encode_prompts


def _outside_autocast():
    """CUDA autocast off for the block. Why: the engine picks its own precision for every kernel, including its
    start-up profiling, compilation and CUDA-graph capture, and none of it expects an enclosing autocast; and the
    LoRA merge of a weight sync under bfloat16 autocast multiplies the float32 adapters in bfloat16, so the
    engine would get other weights than the saved (merged outside autocast) checkpoint."""
    return torch.autocast(device_type="cuda", enabled=False)


class VLLMSampler:
    def __init__(self, model_path: str, tokenizer, *, dtype: torch.dtype, memory_fraction: float, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights sync in memory
        from vllm import LLM

        kwargs = dict(
            model=str(model_path),
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            gpu_memory_utilization=memory_fraction,
            seed=seed,
            enable_prefix_caching=True,
        )
        with _outside_autocast():  # built lazily, inside the first step's autocast
            try:
                self.llm = LLM(**kwargs, logprobs_mode="processed_logprobs")
            except TypeError:  # older vLLM: no logprobs_mode (see the module docstring)
                self.llm = LLM(**kwargs)
        self.tokenizer = tokenizer

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the student's current weights into the engine (LoRA adapters merged first), then drop the
        engine's prefix cache: its prompt KV was computed with the previous weights."""
        with _outside_autocast():
            source = merged_copy(model) if is_lora(model) else model
            weights = [(name, p.detach()) for name, p in source.state_dict().items()]

            def load(worker, named):  # runs inside the (in-process) vLLM worker
                worker.model_runner.model.load_weights(weights=named)

            try:
                self.llm.collective_rpc(load, args=(weights,))
            except (AttributeError, TypeError):  # older engines expose the model directly
                self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights)
            self.llm.reset_prefix_cache()

    @torch.no_grad()
    def __call__(
        self,
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
        from vllm import SamplingParams

        self.sync_weights(model)
        dev = next(model.parameters()).device
        draws = draw_groups or [(len(prompts), generator)]  # each group's rows seeded from its own generator
        seeds = [s for n, g in draws for s in torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()]
        requests = [{"prompt_token_ids": prompt_format.token_ids(tokenizer, p)} for p in prompts]
        params = [
            SamplingParams(
                temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, logprobs=0, seed=s,
                skip_special_tokens=False,
            )
            for s in seeds
        ]
        with _outside_autocast():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        rows: list[list[int]] = []
        lps: list[list[float]] = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            lp = [float(step[tok].logprob) for tok, step in zip(ids, sample.logprobs or [], strict=False)]
            if eos in ids:  # keep EOS as the last completion token, as the PyTorch sampler does
                ids = ids[: ids.index(eos) + 1]
            rows.append(ids)
            lps.append(lp[: len(ids)] + [0.0] * (len(ids) - len(lp)))
        return pack_batch(tokenizer, prompts, rows, lps, eos=eos, pad=pad, device=dev, domains=domains,
                          group_ids=group_ids, references=references, prompt_format=prompt_format)


def pack_batch(tokenizer, prompts, rows, lps, *, eos, pad, device, domains, group_ids, references,
               prompt_format: PromptFormat = RAW) -> RolloutBatch:
    """Completion token lists + their logprobs -> the sampler's `RolloutBatch` layout, on `device`."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, prompt_format)
    B = prompt_ids.shape[0]
    T = max((len(r) for r in rows), default=0)
    new_ids = torch.full((B, T), pad, dtype=torch.long)
    new_lp = torch.zeros((B, T))
    new_mask = torch.zeros((B, T))
    for i, (r, lp) in enumerate(zip(rows, lps, strict=True)):
        new_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        new_lp[i, : len(r)] = torch.tensor(lp)
        new_mask[i, : len(r)] = 1.0
    completions = [completion_text(tokenizer, [t for t in r if t != eos]) for r in rows]
    batch = rollout_batch(prompt_ids, prompt_mask, new_ids, new_lp, new_mask, prompts=prompts,
                          completions=completions, domains=domains, group_ids=group_ids, references=references)
    return batch.to(device)
