"""`mopd serve MODEL_DIR`: any Hugging Face causal LM as a teacher server with vLLM's request and response format.

Why: a teacher on a machine without vLLM (a CPU box, a small GPU) and the tests of the HTTP backend need a server
that speaks what `teachers.http` asks of vLLM, and nothing more:
- `GET /v1/models`: `{"object": "list", "data": [{"id": NAME, "object": "model", "max_model_len": N}]}`;
- `POST /tokenize` `{model, prompt, add_special_tokens}` -> `{count, max_model_len, tokens}` (vLLM's endpoint);
- `POST /v1/completions` `{model, prompt: ids | [ids, ...] | text, max_tokens <= 1, prompt_logprobs: k}` ->
  `choices[i].prompt_logprobs`: per prompt token, null for the first, then `{id: {logprob, rank,
  decoded_token}}` with the actual token and the k best (rank 1 = most likely), and `text`: the greedy next
  token when `max_tokens` is 1. Logprobs are the model's raw log-softmax in float32 (vLLM's default
  `raw_logprobs`). A request's prompts are scored as one right-padded batch.
and one endpoint of its own, which `teachers.http` uses when `/v1/models` says `owned_by: mopd`:
- `POST /v1/mopd/score` `{model, method: sampled | topk, input_ids, attention_mask, completion_mask (tensors as
  `teachers.wire` writes them), k, window, logit_chunk, vocab_block, share_prefill}` -> `{outputs: [tensors]}`:
  what `TeacherPanel.sampled_logprobs` / `.topk` return for that padded batch with those step settings. It is the
  in-process computation on the same tensors, so an HTTP teacher gives the in-process numbers byte for byte.
With an API key (`mopd serve --api-key-env NAME`), every request must carry `Authorization: Bearer KEY`, as vLLM's
and SGLang's `--api-key` ask. One request is scored at a time. FastAPI and uvicorn are the `serve` extra.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def _entry(tok, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {"logprob": logprob, "rank": rank, "decoded_token": tok.decode([token_id])}


BATCH_LOGIT_BYTES = 256 * 2**20  # rows per forward pass of /v1/completions: their float32 logits stay under this


@torch.no_grad()
def batch_logprobs(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's next-token logprobs [len, V] (float32, CPU), the prompts right-padded into batches."""
    from ..models.forward import sequence_logits

    dev = next(model.parameters()).device
    V = int(model.config.vocab_size)
    longest = max(len(p) for p in prompts)
    per = max(1, BATCH_LOGIT_BYTES // (longest * V * 4))
    out = []
    for i in range(0, len(prompts), per):
        chunk = prompts[i:i + per]
        T = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, :len(p)], mask[r, :len(p)] = torch.tensor(p), 1
        logits = sequence_logits(model, ids.to(dev), mask.to(dev)).float().log_softmax(-1).cpu()
        out += [logits[r, :len(p)] for r, p in enumerate(chunk)]
    return out


def prompt_logprobs(tok, ids: list[int], logprobs: torch.Tensor, k: int | None) -> tuple[list | None, int]:
    """vLLM's `prompt_logprobs` of one prompt from its logprobs [len, V] (k None: not asked -> None) and its
    greedy next token."""
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


def exact_scores(model, body: dict) -> list[torch.Tensor]:
    """`/v1/mopd/score`: the in-process panel's scores of the padded batch in `body` (see the module docstring)."""
    from . import wire
    from .actor import scoring_batch
    from .panel import TeacherPanel

    dev = next(model.parameters()).device
    ids, mask, completion = (wire.decode(body[key]) for key in ("input_ids", "attention_mask", "completion_mask"))
    if not (ids.dim() == 2 and ids.shape == mask.shape == completion.shape) or ids.dtype != torch.int64:
        raise ValueError("input_ids, attention_mask and completion_mask must be [B, T], the ids int64")
    panel = TeacherPanel(models={"t": model}, teacher_of_domain={}, logit_chunk=body.get("logit_chunk"),
                         vocab_block=body.get("vocab_block"), share_prefill=bool(body.get("share_prefill")))
    batch = scoring_batch(ids, mask, completion).to(dev)
    names = ["t"] * batch.size
    if body.get("method") == "sampled":
        return [panel.sampled_logprobs(batch, names).cpu()]
    if body.get("method") == "topk":
        return [t.cpu() for t in panel.topk(batch, names, int(body["k"]), int(body["window"]))]
    raise ValueError("method: sampled or topk")


def build_app(model_dir: str | Path, name: str | None = None, dtype: torch.dtype | None = None,
              api_key: str | None = None, owned_by: str = "mopd"):
    """The FastAPI app serving `model_dir` as `name` (default: the directory's name); with `api_key`, every request
    must carry it as a bearer token. `owned_by` other than "mopd" hides the exact endpoint from clients (the tests
    of the vLLM path)."""
    import threading

    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from ..models.checkpoint import load_model, load_tokenizer
    from . import wire

    model = load_model(str(model_dir), dtype=dtype or torch.float32).eval().requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    tok = load_tokenizer(str(model_dir))
    name = name or Path(model_dir).name
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    app = FastAPI(title=f"mopd serve {name}")
    one_at_a_time = threading.Lock()

    if api_key:
        @app.middleware("http")
        async def bearer(request: Request, call_next):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse({"object": "error", "message": "Unauthorized", "code": 401}, status_code=401)
            return await call_next(request)

    def check_model(requested: str | None) -> None:
        if requested not in (None, name):
            raise HTTPException(404, f"The model `{requested}` does not exist (served: {name})")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": owned_by,
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
        with one_at_a_time:
            scored = batch_logprobs(model, prompts)
        for i, (ids, logprobs) in enumerate(zip(prompts, scored, strict=True)):
            lps, greedy = prompt_logprobs(tok, ids, logprobs, k)
            n_tokens += len(ids)
            choices.append({"index": i, "text": tok.decode([greedy]) if max_tokens else "", "logprobs": None,
                            "finish_reason": "length", "prompt_logprobs": lps})
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": n_tokens, "completion_tokens": len(prompts) * int(bool(max_tokens)),
                          "total_tokens": n_tokens + len(prompts) * int(bool(max_tokens))}}

    @app.post("/v1/mopd/score")
    def score(body: dict) -> dict:
        check_model(body.get("model"))
        try:
            with one_at_a_time:
                outputs = exact_scores(model, body)
        except (ValueError, KeyError, TypeError) as e:
            raise HTTPException(400, f"bad scoring request: {e}") from None
        return {"outputs": [wire.encode(t) for t in outputs]}

    return app


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          api_key: str | None = None) -> None:
    """Serve until interrupted (`mopd serve`)."""
    import uvicorn

    uvicorn.run(build_app(model_dir, name, api_key=api_key), host=host, port=port, log_level="warning")
