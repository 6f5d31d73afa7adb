"""`mopd serve MODEL_DIR`: any Hugging Face causal LM as a teacher server with vLLM's request and response format.

Why: a teacher on a machine without vLLM (a CPU box, a small GPU) and the tests of the HTTP backend need a server
that speaks what `teachers.http` asks of vLLM, and nothing more:
- `GET /v1/models`: `{"object": "list", "data": [{"id": NAME, "object": "model", "max_model_len": N}]}`;
- `POST /tokenize` `{model, prompt, add_special_tokens}` -> `{count, max_model_len, tokens}` (vLLM's endpoint);
- `POST /v1/completions` `{model, prompt: ids | [ids, ...] | text, max_tokens <= 1, prompt_logprobs: k}` ->
  `choices[i].prompt_logprobs`: per prompt token, null for the first, then `{id: {logprob, rank,
  decoded_token}}` with the actual token and the k best (rank 1 = most likely), and `text`: the greedy next
  token when `max_tokens` is 1. Logprobs are the model's raw log-softmax in float32 (vLLM's default
  `raw_logprobs`).
Each prompt is scored alone (no padding), so its numbers are the in-process teacher's to float rounding. FastAPI
and uvicorn are the `serve` extra.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def _entry(tok, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": tok.decode([token_id])}


@torch.no_grad()
def prompt_logprobs(model, tok, ids: list[int], k: int | None) -> tuple[list, int]:
    """vLLM's `prompt_logprobs` of one prompt (None: not asked -> None) and its greedy next token."""
    from ..models.forward import sequence_logits

    dev = next(model.parameters()).device
    ids_1_T = torch.tensor([ids], device=dev)
    logprobs = sequence_logits(model, ids_1_T, torch.ones_like(ids_1_T))[0].float().log_softmax(-1).cpu()
    greedy = int(logprobs[-1].argmax())
    if k is None:
        return None, greedy
    out: list = [None]
    top_lp, top_ids = logprobs[:-1].topk(min(k, logprobs.shape[-1]), dim=-1) if k > 0 else (None, None)
    for j in range(1, len(ids)):
        row = logprobs[j - 1]
        actual = float(row[ids[j]])
        entries = {str(ids[j]): _entry(tok, ids[j], actual, 1 + int((row > row[ids[j]]).sum()))}
        if top_lp is not None:
            for r, (lp, t) in enumerate(zip(top_lp[j - 1].tolist(), top_ids[j - 1].tolist(), strict=True), start=1):
                entries.setdefault(str(t), _entry(tok, t, lp, r))
        out.append(entries)
    return out, greedy


def build_app(model_dir: str | Path, name: str | None = None, dtype: torch.dtype | None = None):
    """The FastAPI app serving `model_dir` as `name` (default: the directory's name)."""
    from fastapi import FastAPI, HTTPException

    from ..models.checkpoint import load_model, load_tokenizer

    model = load_model(str(model_dir), dtype=dtype or torch.float32).eval().requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    tok = load_tokenizer(str(model_dir))
    name = name or Path(model_dir).name
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    app = FastAPI(title=f"mopd serve {name}")

    def check_model(requested: str | None) -> None:
        if requested not in (None, name):
            raise HTTPException(404, f"The model `{requested}` does not exist (served: {name})")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "mopd",
                                            "max_model_len": max_len}]}

    @app.post("/tokenize")
    def tokenize(body: dict) -> dict:
        check_model(body.get("model"))
        tokens = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        return {"count": len(tokens), "max_model_len": max_len, "tokens": tokens}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        check_model(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            prompts = [tok(t)["input_ids"] for t in texts]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
            prompts = prompt
        else:
            raise HTTPException(400, "prompt: a text, a list of token ids, or a list of either")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None or max_tokens > 1:
            raise HTTPException(400, "mopd serve scores prompts: max_tokens must be 0 or 1")
        k = body.get("prompt_logprobs")
        choices, n_tokens = [], 0
        for i, ids in enumerate(prompts):
            lps, greedy = prompt_logprobs(model, tok, ids, k)
            n_tokens += len(ids)
            choices.append({"index": i, "text": tok.decode([greedy]) if max_tokens else "", "logprobs": None,
                            "finish_reason": "length", "prompt_logprobs": lps})
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": n_tokens, "completion_tokens": len(prompts) * int(bool(max_tokens)),
                          "total_tokens": n_tokens + len(prompts) * int(bool(max_tokens))}}

    return app


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None) -> None:
    """Serve until interrupted (`mopd serve`)."""
    import uvicorn

    uvicorn.run(build_app(model_dir, name), host=host, port=port, log_level="warning")
