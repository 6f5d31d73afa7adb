"""Fake teacher servers for tests: a tiny model's scores in SGLang's or vLLM's wire format, with ways to go wrong.

SGLang's shapes are the ones its code defines (`TokenizerManager.detokenize_logprob_tokens` and
`detokenize_top_logprobs_tokens`, `/generate` with `input_ids` as a list of prompts): one result per prompt, each
`{"text", "meta_info": {"input_token_logprobs": [[logprob, id, null], ...] (a null logprob first),
"input_top_logprobs": [null, [[logprob, id, null], ...], ...]}}`; `/v1/models` and `/tokenize` answer as vLLM's.
`corrupt(fmt, rows)` may rewrite an answer before it is sent (the bad servers of the validation tests).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from mopd.models.forward import sequence_logits


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:j+1]) for each j: [len, V], the prompt scored alone."""
    with torch.no_grad():
        t = torch.tensor([ids])
        return sequence_logits(model, t, torch.ones_like(t))[0].float().log_softmax(-1)


def sglang_result(model, ids: list[int], k: int) -> dict:
    lp = logprobs_of(model, ids)
    tokens = [[None, ids[0], None]] + [[float(lp[j - 1, ids[j]]), ids[j], None] for j in range(1, len(ids))]
    meta = {"input_token_logprobs": tokens, "output_token_logprobs": [], "prompt_tokens": len(ids)}
    if k:
        top = lp[:-1].topk(k, -1)
        meta["input_top_logprobs"] = [None] + [
            [[float(v), int(i), None] for v, i in zip(top.values[j - 1], top.indices[j - 1], strict=True)]
            for j in range(1, len(ids))]
        meta["output_top_logprobs"] = []
    return {"text": "", "meta_info": meta}


def vllm_choice(model, ids: list[int], k: int, index: int) -> dict:
    lp = logprobs_of(model, ids)
    out: list = [None]
    for j in range(1, len(ids)):
        row = lp[j - 1]
        entries = {str(ids[j]): {"logprob": float(row[ids[j]]), "rank": 1 + int((row > row[ids[j]]).sum())}}
        for r, (v, i) in enumerate(zip(*row.topk(k), strict=True), start=1):
            entries.setdefault(str(int(i)), {"logprob": float(v), "rank": r})
        out.append(entries)
    return {"index": index, "text": "", "prompt_logprobs": out, "finish_reason": "length"}


@contextmanager
def fake_server(model, tok, fmt: str, name: str = "teacher", corrupt: Callable | None = None,
                api_key: str | None = None):
    """A server for `model` in `fmt` ("sglang" or "vllm") on a free port; yields its root URL."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._send(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model", "owned_by": fmt}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path == "/tokenize":
                tokens = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
                self._send(200, {"tokens": tokens, "count": len(tokens), "max_model_len": 512})
            elif self.path == "/generate" and fmt == "sglang":
                prompts = body["input_ids"]
                rows = [sglang_result(model, p, body.get("top_logprobs_num") or 0) for p in prompts]
                self._send(200, corrupt("sglang", rows) if corrupt else rows)
            elif self.path == "/v1/completions" and fmt == "vllm":
                rows = [vllm_choice(model, p, body["prompt_logprobs"], i) for i, p in enumerate(body["prompt"])]
                rows = corrupt("vllm", rows) if corrupt else rows
                self._send(200, {"object": "text_completion", "choices": rows})
            elif self.path == "/v1/completions":  # SGLang's OpenAI endpoint: prompt_logprobs dropped silently
                self._send(200, {"object": "text_completion", "choices": [
                    {"index": i, "text": "", "logprobs": None} for i, _ in enumerate(body["prompt"])]})
            else:
                self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = f"http://127.0.0.1:{server.server_address[1]}"
        server.seen = seen  # type: ignore[attr-defined]
        yield root, seen
    finally:
        server.shutdown()
        server.server_close()
