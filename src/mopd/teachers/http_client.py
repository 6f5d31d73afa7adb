"""Requests to one teacher's servers: replicas, backoff that outlasts a restart, and credentials never shown.

Why a pool and not a URL: a teacher served by several replicas should lose nothing when one dies mid-stage, and a
teacher served by one should survive its server's restart (15-20 s for a small model). So a failed request
(connection refused, timeout, 5xx) goes at once to the next replica that has not failed lately; when every
replica has, it waits 0.5 s, doubling to 2 s, until the teacher's `retry_wait` is spent or `retries` are used.
A refused request (4xx) is the request's fault, not the server's, and is not retried.

Requests are spread round-robin over the replicas that are up. A replica that failed is skipped for `COOLDOWN`
seconds, then tried again. The API key goes in the `Authorization` header only: no message, log or file this
module writes holds it (`ServerError` lines name the URL and the reason).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from ..core.errors import StageError
from ..core.schema import HttpBackend

COOLDOWN = 5.0  # seconds a replica that failed is skipped while another is up
FIRST_WAIT, LONGEST_WAIT = 0.5, 2.0  # backoff when no replica answers: 0.5, 1, 2, 2, ... seconds (a server that is
# back is used within 2 s; a refused connection costs nothing, so waiting longer between tries would save nothing)


class ServerError(StageError):
    """A teacher server that cannot answer (after its retries); str() is one line (the CLI prints it, exit 2)."""


class Refused(ServerError):
    """The server answered with a 4xx: the request (or its credentials) is wrong, so no retry can help."""


def auth_headers(backend: HttpBackend) -> dict[str, str]:
    """The headers every request to `backend` carries: its `headers`, and its API key as a bearer token."""
    headers = {"Content-Type": "application/json", **backend.headers}
    key = backend.api_key.get_secret_value() if backend.api_key is not None else None
    if backend.api_key_env is not None:
        key = os.environ.get(backend.api_key_env)
        if not key:
            raise ServerError(f"api_key_env: the environment variable {backend.api_key_env} is not set")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def request_once(url: str, payload: dict | None, timeout: float, headers: dict[str, str]) -> dict | list:
    """GET (payload None) or POST JSON; the decoded answer. `Refused` on a 4xx, `ServerError` on anything else
    that is not an answer, each with the reason in words (never the headers)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
        if e.code == 401:
            why += " (the server wants an API key: set api_key_env)" if "Authorization" not in headers else \
                " (the server refused the API key)"
        raise (Refused if e.code < 500 else ServerError)(f"{url}: {why}".replace("\n", " ")) from None
    except TimeoutError:
        raise ServerError(f"{url}: no answer within {timeout:g}s (timeout)") from None
    except urllib.error.URLError as e:
        reason = e.reason
        why = f"no answer within {timeout:g}s (timeout)" if isinstance(reason, TimeoutError) else \
            f"cannot connect ({reason})"
        raise ServerError(f"{url}: {why}") from None
    except (ConnectionError, OSError) as e:
        raise ServerError(f"{url}: {e.__class__.__name__}: {e}".replace("\n", " ")) from None
    try:
        return json.loads(body)
    except ValueError:
        raise ServerError(f"{url}: the answer is not JSON ({body[:80]!r})") from None


def request(url: str, payload: dict | None, timeout: float, retries: int = 0,
            headers: dict[str, str] | None = None) -> dict | list:
    """One URL with `retries` immediate retries (the preflight's probes: a server that is down is reported)."""
    for _ in range(retries):
        try:
            return request_once(url, payload, timeout, headers or {"Content-Type": "application/json"})
        except Refused:
            raise
        except ServerError:
            pass
    return request_once(url, payload, timeout, headers or {"Content-Type": "application/json"})


@dataclass
class Replicas:
    """One teacher's servers: `post(path, payload)` to whichever is up, with failover and bounded backoff."""

    backend: HttpBackend
    bases: list[str]  # each replica's URL that `post` paths are appended to
    headers: dict[str, str]
    failed_at: dict[str, float] = field(default_factory=dict)  # replica -> when it last failed
    turn: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _order(self) -> list[str]:
        """The replicas to try, next in turn first; those that failed within COOLDOWN go last."""
        with self.lock:
            self.turn = (self.turn + 1) % len(self.bases)
            start = self.turn
        ring = self.bases[start:] + self.bases[:start]
        now = time.monotonic()
        return sorted(ring, key=lambda u: now - self.failed_at.get(u, -1e9) < COOLDOWN)  # stable: up ones first

    def post(self, path: str, payload: dict) -> tuple[str, dict | list]:
        """(the replica that answered, its answer). Raises `ServerError` naming every replica's last failure."""
        b = self.backend
        waited, wait, tries, last = 0.0, FIRST_WAIT, 0, {}
        while True:
            for base in self._order():
                try:
                    answer = request_once(base + path, payload, b.timeout, self.headers)
                    self.failed_at.pop(base, None)
                    return base, answer
                except Refused:
                    raise
                except ServerError as e:
                    self.failed_at[base] = time.monotonic()
                    last[base] = str(e)
                    tries += 1
                    if tries > b.retries:
                        raise ServerError(self._why(last, tries, waited)) from None
            pause = min(wait, b.retry_wait - waited)
            if pause <= 0:
                raise ServerError(self._why(last, tries, waited))
            time.sleep(pause)
            waited, wait = waited + pause, min(2 * wait, LONGEST_WAIT)

    def _why(self, last: dict[str, str], tries: int, waited: float) -> str:
        named = "; ".join(last.values())
        return f"{named} (after {tries} tries and {waited:.1f}s of backoff over {len(self.bases)} replica(s))"
