"""What the shared prefill and the shrinking decode batch buy: the sampler against its every-row reference.

    .venv/bin/python benchmarks/sampler_padding.py [--vocab 47] [--batch 64] [--group 4] [--tokens 64]
                                                   [--rounds 5] [--threads 1]

One process, one model (the demo's shape, Qwen3 hidden 128, 2 layers, random weights, `--vocab` tokens), the same
prompts (`--batch` / `--group` distinct ones, each repeated `--group` times) and seed: `sampling.sampler._sample`
as `sample` runs it, and with `share_prefill=False, drop_finished=False` (every row prefilled and decoded to the
end: the sampler before issue 17). Rounds alternate the two; medians of the process CPU time. Both give the same
tokens (checked here on every round). Writes results.json key "sampler_padding".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=47)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import _common
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl_vs_mopd import update_results

    from mopd.envs import ALPHABET
    from mopd.models.prompting import RAW
    from mopd.models.tokenizer import build_char_tokenizer
    from mopd.sampling import sampler

    torch.set_num_threads(a.threads)
    tok = build_char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=max(a.vocab, len(tok)), hidden_size=128, intermediate_size=384,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, tie_word_embeddings=True)).eval()
    prompts = [p.prompt for p in _common.problems(a.batch // a.group) for _ in range(a.group)]
    times: dict[str, list[float]] = {"new": [], "every_row": []}
    lengths = None
    for r in range(a.rounds):
        outs = {}
        for name in (("new", "every_row") if r % 2 == 0 else ("every_row", "new")):
            old = name == "every_row"
            c0 = time.process_time()
            outs[name] = sampler._sample(model, tok, prompts, max_new_tokens=a.tokens, temperature=1.0, top_p=1.0,
                                         generator=torch.Generator().manual_seed(r), domains=None, group_ids=None,
                                         references=None, prompt_format=RAW, share_prefill=not old,
                                         drop_finished=not old)
            times[name].append(time.process_time() - c0)
        assert torch.equal(outs["new"].input_ids_B_T, outs["every_row"].input_ids_B_T), "tokens differ"
        lengths = outs["new"].completion_mask_B_T.sum(-1)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"command": "python benchmarks/sampler_padding.py " + " ".join(sys.argv[1:]),
              "machine": _common.machine(), "settings": vars(a), "median_cpu_s": med,
              "speedup": round(med["every_row"] / med["new"], 2), "same_tokens": True,
              "lengths": {"mean": float(lengths.float().mean()), "min": int(lengths.min()), "max": int(lengths.max())},
              "cpu_s": times}
    print(json.dumps({k: result[k] for k in ("median_cpu_s", "speedup", "lengths")}))
    update_results("sampler_padding", result)


if __name__ == "__main__":
    main()
