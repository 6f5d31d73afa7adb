"""Teachers behind HTTP servers that return prompt logprobs: vLLM, SGLang, `mopd serve`.

Three ways to ask, chosen per teacher at `connect`:
- **vLLM** (`api: openai`, docs/SCALING.md cites its documentation): `POST {url}/completions` with the rows'
  token ids as `prompt` (a list of id lists, so nothing is re-tokenized), `max_tokens: 1`, `temperature: 0`,
  `prompt_logprobs: k`.
- **SGLang** (`api: sglang`): its native `POST {root}/generate` with `input_ids`, `max_new_tokens: 0`,
  `return_logprob`, `logprob_start_len: 0`, `top_logprobs_num: k` (SGLang's OpenAI endpoint has no
  `prompt_logprobs`: it drops the field and answers without them).
- **`mopd serve`** (it says so in `/v1/models`): `POST {url}/mopd/score` with the teacher's rows as the padded
  batch the in-process panel reads, scored by the same `TeacherPanel` code with the stage's step settings, so an
  HTTP teacher gives the in-process numbers byte for byte (as an actor does), at the same thread count.

Every answer is checked (`http_answers`) before it is used; a bad one is one `ServerError` line naming the stage,
the teacher, the URL and what was wrong. A server returns at most its `--max-logprobs` entries per position, never
the full distribution, so the full-distribution objectives are refused at load (`core.schema.teachers`).

Before step 0 (`connect`), each replica must answer `GET {url}/models`, serve the named model and tokenize as the
student does (`POST {root}/tokenize` of a probe text built from the student's vocabulary: vLLM's and SGLang's
endpoint). Then, unless `order_check: false`, one prompt is scored alone and beside another that shares its first
half, in both orders: vLLM issue 42019 reports prompt logprobs that depend on request order with prefix caching
on (its default). Requests run on a thread pool (`concurrency` per teacher), spread over the replicas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from ..core.batch import RolloutBatch
from ..core.schema import HttpBackend
from ..models.tokenizer import tokenizer_fingerprint
from . import wire
from .http_answers import BadAnswer, RowScores, read_sglang, read_vllm
from .http_client import Refused, Replicas, ServerError, auth_headers, request
from .preflight import PreflightError
from .remote import Pending

__all__ = ["HttpTeacher", "ServerError", "connect", "connect_all", "probe_ids", "server_root"]

PROBE = "The quick brown fox jumps over 13 lazy dogs: 12+34=46, def f(x): return x[::-1] # done.\n"
ORDER_TOLERANCE = 1.0  # nats; see `order_problem`


def server_root(url: str) -> str:
    """The server's root from its OpenAI base URL (vLLM's /tokenize sits beside /v1, not under it)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class HttpTeacher:
    """`remote.RemoteTeacher` over one teacher's servers (its replicas) and model."""

    def __init__(self, stage: str, name: str, backend: HttpBackend, model: str, exact: bool):
        self.stage, self.name, self.backend, self.model, self.exact = stage, name, backend, model, exact
        bases = backend.urls if backend.api == "openai" else [server_root(u) for u in backend.urls]
        self.replicas = Replicas(backend, bases, auth_headers(backend))
        self.pool = ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix=f"teacher-{name}")
        # the step settings the in-process panel scores with (`stages.step_sizing.apply_to_panel`): the exact path
        # sends them, so the server blocks its logits as this process would
        self.step_settings = {"logit_chunk": None, "vocab_block": None, "share_prefill": False}

    @property
    def scoring(self) -> str:
        """How this teacher is asked (preflight.json's `served_teachers`)."""
        if self.exact:
            return "mopd serve: the in-process computation (/v1/mopd/score)"
        return "SGLang /generate input_token_logprobs" if self.backend.api == "sglang" else \
            "vLLM /v1/completions prompt_logprobs"

    def _fail(self, url: str, why: str) -> ServerError:
        return ServerError(f"stage {self.stage!r}: teacher {self.name!r} at {url}: {why}".replace("\n", " "))

    def _post(self, path: str, payload: dict, read):
        """POST to a replica and read its answer with `read(answer)`; every failure is one line."""
        try:
            url, answer = self.replicas.post(path, payload)
        except ServerError as e:
            raise ServerError(f"stage {self.stage!r}: teacher {self.name!r}: {e}") from None
        try:
            return read(answer)
        except (BadAnswer, ValueError, KeyError, TypeError) as e:
            raise self._fail(url + path, f"bad answer: {e}") from None

    # --- vLLM and SGLang: per-row prompt logprobs ---
    def score_prompts(self, prompts: list[list[int]], k: int) -> list[RowScores]:
        """Each prompt's checked scores, from one request."""
        if self.backend.api == "sglang":
            payload = {"input_ids": prompts, "return_logprob": True, "logprob_start_len": 0,
                       "top_logprobs_num": k, "sampling_params": {"max_new_tokens": 0, "temperature": 0.0}}
            return self._post("/generate", payload, lambda a: read_sglang(a, prompts, k))
        payload = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": max(k, 1)}
        return self._post("/completions", payload, lambda a: read_vllm(
            a["choices"] if isinstance(a, dict) and "choices" in a else a, prompts, k))

    def _rows(self, batch: RolloutBatch, k: int):
        """Start the requests of every row (chunks of rows, one request each); a function that waits for
        (each row's real columns, its ids, its `RowScores`)."""
        cols = [torch.nonzero(m, as_tuple=True)[0] for m in batch.attention_mask_B_T.bool()]
        ids = [batch.input_ids_B_T[b, c].tolist() for b, c in enumerate(cols)]
        per = max(1, math.ceil(len(ids) / self.backend.concurrency))
        chunks = [ids[i:i + per] for i in range(0, len(ids), per)]
        futures = [self.pool.submit(self.score_prompts, chunk, k) for chunk in chunks]
        return lambda: (cols, ids, [row for f in futures for row in f.result()])

    # --- mopd serve: the in-process computation on the server ---
    def _exact(self, method: str, batch: RolloutBatch, **args) -> Pending:
        payload = {"model": self.model, "method": method, **args, **self.step_settings,
                   "input_ids": wire.encode(batch.input_ids_B_T), "attention_mask": wire.encode(batch.attention_mask_B_T),
                   "completion_mask": wire.encode(batch.completion_mask_B_T)}

        def read(answer):
            out = [wire.decode(x) for x in answer["outputs"]]
            for t in out:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise BadAnswer("a score is not finite")
            if method == "sampled" and [tuple(t.shape) for t in out] != [tuple(batch.input_ids_B_T.shape)]:
                raise BadAnswer(f"shapes {[tuple(t.shape) for t in out]}, expected {[tuple(batch.input_ids_B_T.shape)]}")
            if bool((out[-1] > 0).any()):
                raise BadAnswer("a sampled-token logprob is > 0")
            return out[0] if method == "sampled" else tuple(out)
        future = self.pool.submit(self._post, "/mopd/score", payload, read)
        return future.result

    def sampled(self, batch: RolloutBatch) -> Pending:
        if self.exact:
            return self._exact("sampled", batch)
        wait = self._rows(batch, 0)

        def result() -> torch.Tensor:
            cols, ids, scored = wait()
            out = torch.zeros(batch.input_ids_B_T.shape, dtype=torch.float32)
            for b, (c, row, s) in enumerate(zip(cols, ids, scored, strict=True)):
                out[b, c[1:len(row)]] = torch.tensor(s.sampled[1:], dtype=torch.float32)
            return out * batch.completion_mask_B_T
        return result

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        if self.exact:
            return self._exact("topk", batch, k=k, window=window)
        wait = self._rows(batch, k)
        T = batch.input_ids_B_T.shape[1]

        def result():
            cols, ids, scored = wait()
            B = batch.size
            top_lp, top_ids = torch.zeros(B, window, k), torch.zeros(B, window, k, dtype=torch.long)
            sampled = torch.zeros(B, T)
            for b, (c, row, s) in enumerate(zip(cols, ids, scored, strict=True)):
                sampled[b, c[1:len(row)]] = torch.tensor(s.sampled[1:], dtype=torch.float32)
                for j in range(1, len(row)):
                    w = int(c[j]) - (T - window)
                    if w >= 0 and s.top[j]:
                        top_lp[b, w, : len(s.top[j])] = torch.tensor([lp for _, lp in s.top[j]])
                        top_ids[b, w, : len(s.top[j])] = torch.tensor([t for t, _ in s.top[j]])
            return top_lp, top_ids, sampled * batch.completion_mask_B_T
        return result

    def logits(self, batch: RolloutBatch, keep: int) -> Pending:
        raise ServerError(f"stage {self.stage!r}: teacher {self.name!r}: an HTTP teacher returns top-k logprobs, "
                          "not full logits")


def probe_ids(student_tok) -> tuple[str, list[int]]:
    """A text that touches the student's vocabulary (every 97th token, its special tokens, a fixed sentence)
    and the ids the student's tokenizer gives it: a server that tokenizes it differently scores other ids."""
    V = len(student_tok)
    text = PROBE + student_tok.decode(list(range(0, V, max(1, V // 97))), skip_special_tokens=True)
    text += "".join(student_tok.all_special_tokens)
    return text, student_tok(text, add_special_tokens=False)["input_ids"]


def order_problem(teacher: HttpTeacher, ids: list[int]) -> str | None:
    """Why the server's prompt logprobs depend on what else is in the request, or None.

    Prompt A and prompt B share their first half; A is scored alone, then as [A, B] and [B, A]. A server that reuses
    a cached prefix's stale values (vLLM issue 42019) gives A other numbers in some order. Numbers that differ by
    float rounding of another batch shape are not that: a bfloat16 logit of magnitude <= 64 rounds by <= 0.25, so a
    logprob (a difference of two) moves by <= 0.5; a stale value is another position's logprob, off by nats. Hence
    a difference above ORDER_TOLERANCE (1 nat) is reported."""
    half = max(2, len(ids) // 2)
    a, b = ids[: 2 * half], ids[:half] + ids[half:2 * half][::-1]
    if a == b:
        return None
    alone = teacher.score_prompts([a], 0)[0].sampled
    for order, where in (([a, b], 0), ([b, a], 1)):
        got = teacher.score_prompts(order, 0)[where].sampled
        diff = max(abs(x - y) for x, y in zip(alone[1:], got[1:], strict=True))
        if diff > ORDER_TOLERANCE:
            return (f"scores one prompt differently when another shares its prefix in the same request (by up to "
                    f"{diff:.3g} nats at order {'AB' if where == 0 else 'BA'}); with vLLM, start the server with "
                    "--no-enable-prefix-caching (vLLM issue 42019), or set order_check: false to accept it")
    return None


def connect(stage: str, name: str, backend: HttpBackend, student_tok, whose: str = "the student") -> HttpTeacher:
    """Check that every replica answers, serves the model and tokenizes as the student does (`whose`: the tokenizer
    `student_tok` is, as the error line names it), and that scores do not depend on request order; one line if
    not."""
    try:
        headers = auth_headers(backend)
    except ServerError as e:
        raise PreflightError(f"stage {stage!r}: teacher {name!r}: {e}") from None
    text, want = probe_ids(student_tok)
    model, exact = backend.model, True
    for url in backend.urls:
        where = f"stage {stage!r}: teacher {name!r} at {url}"
        models_url = (url if backend.api == "openai" else server_root(url) + "/v1") + "/models"
        try:
            listed = request(models_url, None, backend.timeout, backend.retries, headers)["data"]
            served = [m["id"] for m in listed]
        except Refused as e:
            raise PreflightError(f"{where}: {e}") from None
        except (ServerError, KeyError, TypeError) as e:
            raise PreflightError(f"{where}: the server does not list its models ({e})") from None
        if backend.model is None and len(served) != 1:
            raise PreflightError(f"{where}: the server serves {served}; name one with `model:`")
        if backend.model is not None and backend.model not in served:
            raise PreflightError(f"{where}: the server does not serve model {backend.model!r} (it serves {served})")
        model = backend.model or served[0]
        exact = exact and backend.api == "openai" and any(m.get("owned_by") == "mopd" for m in listed)
        try:
            got = request(server_root(url) + "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False},
                          backend.timeout, backend.retries, headers)["tokens"]
        except (ServerError, KeyError, TypeError) as e:
            raise PreflightError(f"{where}: cannot check its tokenizer with /tokenize ({e})") from None
        if got != want:
            i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            raise PreflightError(
                f"{where}: uses a different tokenizer from {whose} (a probe text tokenizes to {len(got)} ids on the "
                f"server, to {len(want)} with {whose}; first difference at token {i}: server {got[i:i + 3]}, "
                f"expected {want[i:i + 3]}); the teacher must score the token ids "
                + ("of the student (on-policy distillation)" if whose == "the student" else "its tokenizer gives"))
    teacher = HttpTeacher(stage, name, backend, model, exact)
    if backend.order_check and not exact:
        try:
            why = order_problem(teacher, want)
        except ServerError as e:
            raise PreflightError(str(e)) from None
        if why:
            raise PreflightError(f"stage {stage!r}: teacher {name!r} at {backend.urls[0]}: {why}")
    return teacher


def connect_all(stage: str, backends: Mapping[str, HttpBackend], student_tok,
                own_toks: Mapping[str, object] | None = None) -> dict[str, HttpTeacher]:
    """`connect` every HTTP teacher; teachers with the same URLs and model, checked against the same tokenizer,
    share one client. A teacher in `own_toks` (one of another tokenizer, `teachers.cross_tokenizer`) is scored in
    its own token ids: its server must tokenize as that tokenizer does (so two such teachers of one server but of
    different tokenizers are each checked, and one of them refused)."""
    out: dict[str, HttpTeacher] = {}
    shared: dict[tuple, HttpTeacher] = {}
    own_toks = own_toks or {}
    for name in sorted(backends):
        b = backends[name]
        key = (tuple(b.urls), b.model, b.api, tokenizer_fingerprint(own_toks[name]) if name in own_toks else None)
        if key not in shared:
            shared[key] = connect(stage, name, b, own_toks[name], "its checkpoint's tokenizer") if name in own_toks \
                else connect(stage, name, b, student_tok)
        out[name] = shared[key]
    return out
