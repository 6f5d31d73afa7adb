"""Teachers behind an OpenAI-compatible HTTP server that returns prompt logprobs (vLLM, SGLang, `mopd serve`).

The request is vLLM's (docs/SCALING.md cites its documentation): `POST {url}/completions` with the rows' token
ids as `prompt` (a list of id lists, so nothing is re-tokenized), `max_tokens: 1`, `temperature: 0` and
`prompt_logprobs: k`. Each choice's `prompt_logprobs` is a list with one entry per prompt token: null for the
first, then `{token_id: {logprob, rank, decoded_token}}` holding the actual token and the top k. The actual
token's entry is the sampled-token logprob; the k best entries are the top-k. A server returns at most its
`--max-logprobs` entries per position, never the full distribution, so the full-distribution objectives are
refused at load (`core.schema.teachers.backend_problem`).

Before step 0 (`connect`): the server must answer `GET {url}/models` and serve the named model, and its tokenizer
must be the student's: `POST {root}/tokenize` (vLLM's tokenizer endpoint, at the server root) of a probe text
built from the student's vocabulary and special tokens must give the student's ids. Connection errors,
timeouts and a different tokenizer are one `PreflightError` line naming the stage, teacher and URL.

Requests run on a thread pool (`concurrency` per server), so every teacher's rows are in flight at once.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from ..core.batch import RolloutBatch
from ..core.errors import StageError
from ..core.schema import HttpBackend
from .preflight import PreflightError
from .remote import Pending

PROBE = "The quick brown fox jumps over 13 lazy dogs: 12+34=46, def f(x): return x[::-1] # done.\n"


class ServerError(StageError):
    """A teacher server that cannot answer (after its retries); str() is one line (the CLI prints it, exit 2)."""


def request(url: str, payload: dict | None, timeout: float, retries: int = 0) -> dict:
    """GET (payload None) or POST JSON to `url`; the decoded JSON answer. Connection errors, timeouts and 5xx
    are retried `retries` times; then (and on a 4xx) `ServerError` with the reason in words."""
    data = None if payload is None else json.dumps(payload).encode()
    why = ""
    for _ in range(retries + 1):
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
            if e.code < 500:
                break
        except TimeoutError:
            why = f"no answer within {timeout:g}s (timeout)"
        except urllib.error.URLError as e:
            reason = e.reason
            why = (f"no answer within {timeout:g}s (timeout)" if isinstance(reason, TimeoutError)
                   else f"cannot connect ({reason})")
        except (ConnectionError, OSError, ValueError) as e:
            why = f"{e.__class__.__name__}: {e}"
    raise ServerError(f"{url}: {why}".replace("\n", " "))


def server_root(url: str) -> str:
    """The server's root from its OpenAI base URL (vLLM's /tokenize sits beside /v1, not under it)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class HttpTeacher:
    """`remote.RemoteTeacher` over one server and model."""

    def __init__(self, stage: str, name: str, backend: HttpBackend, model: str):
        self.stage, self.name, self.backend, self.model = stage, name, backend, model
        self.pool = ThreadPoolExecutor(max_workers=backend.concurrency, thread_name_prefix=f"teacher-{name}")

    def _rows(self, batch: RolloutBatch, k: int) -> Pending:
        """Start the requests of every row (chunks of rows, one request each) -> per row (its real columns,
        its `prompt_logprobs` list)."""
        cols = [torch.nonzero(m, as_tuple=True)[0] for m in batch.attention_mask_B_T.bool()]
        ids = [batch.input_ids_B_T[b, c].tolist() for b, c in enumerate(cols)]
        per = max(1, math.ceil(len(ids) / self.backend.concurrency))
        chunks = [list(range(i, min(i + per, len(ids)))) for i in range(0, len(ids), per)]
        futures = [self.pool.submit(self._score, [ids[b] for b in chunk], k) for chunk in chunks]

        def wait():
            out = []
            for f in futures:
                out += f.result()
            return cols, ids, out
        return wait

    def _score(self, prompts: list[list[int]], k: int) -> list[list]:
        url = self.backend.url.rstrip("/") + "/completions"
        payload = {"model": self.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": k}
        try:
            answer = request(url, payload, self.backend.timeout, self.backend.retries)
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            return [c["prompt_logprobs"] for c in choices]
        except ServerError as e:
            raise ServerError(f"stage {self.stage!r}: teacher {self.name!r}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ServerError(f"stage {self.stage!r}: teacher {self.name!r}: {url} answered without "
                              f"prompt_logprobs ({e!r}); the server must support vLLM's `prompt_logprobs`") from None

    def sampled(self, batch: RolloutBatch) -> Pending:
        wait = self._rows(batch, 1)

        def result() -> torch.Tensor:
            cols, ids, scored = wait()
            out = torch.zeros(batch.input_ids_B_T.shape, dtype=torch.float32)
            for b, (c, row, lps) in enumerate(zip(cols, ids, scored, strict=True)):
                for j in range(1, len(row)):
                    out[b, c[j]] = lps[j][str(row[j])]["logprob"]
            return out * batch.completion_mask_B_T
        return result

    def topk(self, batch: RolloutBatch, k: int, window: int) -> Pending:
        wait = self._rows(batch, k)
        T = batch.input_ids_B_T.shape[1]

        def result():
            cols, ids, scored = wait()
            B = batch.size
            top_lp, top_ids = torch.zeros(B, window, k), torch.zeros(B, window, k, dtype=torch.long)
            sampled = torch.zeros(B, T)
            for b, (c, row, lps) in enumerate(zip(cols, ids, scored, strict=True)):
                for j in range(1, len(row)):
                    entries = lps[j]
                    sampled[b, c[j]] = entries[str(row[j])]["logprob"]
                    w = int(c[j]) - (T - window)
                    if w < 0:
                        continue
                    best = sorted(entries.items(), key=lambda kv: -kv[1]["logprob"])[:k]
                    top_lp[b, w, : len(best)] = torch.tensor([e["logprob"] for _, e in best])
                    top_ids[b, w, : len(best)] = torch.tensor([int(t) for t, _ in best])
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


def connect(stage: str, name: str, backend: HttpBackend, student_tok) -> HttpTeacher:
    """Check that the server answers, serves the model and tokenizes as the student does; one line if not."""
    where = f"stage {stage!r}: teacher {name!r} at {backend.url}"
    try:
        served = [m["id"] for m in request(backend.url.rstrip("/") + "/models", None, backend.timeout,
                                           backend.retries)["data"]]
    except (ServerError, KeyError, TypeError) as e:
        raise PreflightError(f"{where}: the server does not list its models ({e})") from None
    model = backend.model
    if model is None and len(served) != 1:
        raise PreflightError(f"{where}: the server serves {served}; name one with `model:`")
    if model is not None and model not in served:
        raise PreflightError(f"{where}: the server does not serve model {model!r} (it serves {served})")
    model = model or served[0]
    text, want = probe_ids(student_tok)
    try:
        got = request(server_root(backend.url) + "/tokenize",
                      {"model": model, "prompt": text, "add_special_tokens": False}, backend.timeout,
                      backend.retries)["tokens"]
    except (ServerError, KeyError, TypeError) as e:
        raise PreflightError(f"{where}: cannot check its tokenizer with /tokenize ({e})") from None
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
        raise PreflightError(
            f"{where}: uses a different tokenizer from the student (a probe text tokenizes to {len(got)} ids, "
            f"the student's to {len(want)}; first difference at token {i}: server {got[i:i + 3]}, student "
            f"{want[i:i + 3]}); on-policy distillation needs the teacher to score the student's token ids")
    return HttpTeacher(stage, name, backend, model)


def connect_all(stage: str, backends: Mapping[str, HttpBackend], student_tok) -> dict[str, HttpTeacher]:
    """`connect` every HTTP teacher; teachers with the same URL and model share one client."""
    out: dict[str, HttpTeacher] = {}
    shared: dict[tuple, HttpTeacher] = {}
    for name in sorted(backends):
        b = backends[name]
        key = (b.url.rstrip("/"), b.model)
        if key not in shared:
            shared[key] = connect(stage, name, b, student_tok)
        out[name] = shared[key]
    return out
