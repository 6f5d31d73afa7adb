"""Where a MOPD stage's teachers score: the `teacher_backends:` map of a mopd stage.

Why a separate map keyed by teacher (rather than objects inside `teachers:`): `teachers: {domain: teacher}` keeps
one form in every recipe and every module that reads it (references, identities, lineage, tokenizer checks),
and where a teacher runs is not what the student is trained on, so the map stays out of the stage's identity
(`recipe.identity.SETTINGS_NOT_IN_IDENTITY`). A teacher absent from the map scores in the trainer's process,
as before. A teacher named by several domains is one entry, so they share one actor or one server.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_serializer, field_validator, model_validator

from ..extras import import_problem
from .strict import Strict, rule_error


class TeacherResources(Strict):
    """What one teacher actor reserves on the Ray cluster (fractions share a device)."""

    cpus: float = Field(1.0, ge=0, description="CPU cores the actor reserves (its torch threads: at least 1)")
    gpus: float = Field(0.0, ge=0, description="GPUs the actor reserves; > 0 scores on its GPU")


class ActorBackend(Strict):
    """The teacher's checkpoint is loaded by one Ray actor, on its own worker (and device) with `resources`;
    every actor scores its routed rows at the same time as the others."""

    backend: Literal["actor"]
    resources: TeacherResources = Field(default_factory=lambda: TeacherResources())
    max_restarts: int = Field(3, ge=0, description="times Ray restarts a dead actor (its call is then retried)")
    ready_timeout: float = Field(300.0, gt=0, description="seconds to wait for the actor to load its teacher")


URL_PATTERN = r"^https?://\S+$"


class HttpBackend(Strict):
    """A server that returns prompt logprobs: vLLM or `mopd serve` through vLLM's OpenAI-compatible
    `/v1/completions` with `prompt_logprobs` (`api: openai`), SGLang through its native `/generate` with
    `return_logprob` (`api: sglang`; its OpenAI endpoint drops `prompt_logprobs`). Sampled-token logprobs and top-k
    only: a server returns at most `max_logprobs` per position, so the full-distribution objectives are refused.
    Several URLs are replicas of one teacher: requests are spread over them, and one that dies is left out while
    the others answer."""

    backend: Literal["http"]
    url: str | list[str] = Field(description="the server's base URL (vLLM, mopd serve: the OpenAI base, e.g. "
                                             "http://host:8000/v1; SGLang: its root, e.g. http://host:30000), or "
                                             "a list of replicas' URLs")
    api: Literal["openai", "sglang"] = Field("openai", description="openai: /v1/completions with prompt_logprobs "
                                                                   "(vLLM, mopd serve); sglang: SGLang's /generate")
    model: str | None = Field(None, description="the served model name; null: the server's only model")
    timeout: float = Field(60.0, gt=0, description="seconds per request before it counts as failed")
    retries: int = Field(40, ge=0, description="retries of a failed request (connection error, timeout, 5xx), on "
                                               "another replica at once or, when none answers, after a backoff")
    retry_wait: float = Field(60.0, ge=0, description="the most seconds one request waits in backoff, in all "
                                                      "(0.5 s doubling to 2 s: a server restart is bridged)")
    max_logprobs: int = Field(20, gt=0, description="the server's limit on logprobs per position (vLLM --max-logprobs)")
    concurrency: int = Field(8, gt=0, description="requests in flight to this teacher at once")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                    description="the environment variable holding the server's API key (vLLM and "
                                                "SGLang --api-key), sent as `Authorization: Bearer`")
    api_key: SecretStr | None = Field(None, description="the API key itself (prefer api_key_env: the run "
                                                        "directory keeps a copy of the recipe)")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers on every request")
    order_check: bool = Field(True, description="before step 0, score one prompt alone and beside another in both "
                                                "orders; different numbers are one line (vLLM issue 42019: prompt "
                                                "logprobs with prefix caching on)")

    @field_validator("url")
    @classmethod
    def _urls_are_urls(cls, value: str | list[str]) -> str | list[str]:
        urls = [value] if isinstance(value, str) else value
        if not urls:
            raise ValueError("url: give at least one URL")
        bad = [u for u in urls if not re.match(URL_PATTERN, u)]
        if bad:
            raise ValueError(f"url {bad[0]!r} is not an http:// or https:// URL")
        if len(set(u.rstrip("/") for u in urls)) != len(urls):
            raise ValueError("url: a replica is listed twice")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> HttpBackend:
        if self.api_key is not None and self.api_key_env is not None:
            raise rule_error(self, "api_key", message="give api_key or api_key_env, not both")
        return self

    @field_serializer("headers", when_used="json")
    def _headers_unshown(self, headers: dict[str, str]) -> dict[str, str]:
        """Header values often carry a credential: lineage, trackers and reports see only the names."""
        return {name: "**********" for name in headers}

    @property
    def urls(self) -> list[str]:
        """The replicas' URLs, without a trailing slash."""
        return [u.rstrip("/") for u in ([self.url] if isinstance(self.url, str) else self.url)]


TeacherBackend = Annotated[ActorBackend | HttpBackend, Field(discriminator="backend")]
FULL_DISTRIBUTION = ("full_reverse_kl", "forward_kl", "jsd")  # objectives that read every logit of the teacher


def backend_problem(stage) -> str | None:
    """Why a mopd stage's `teacher_backends` cannot work with its other settings, in words; None when it can
    (`recipe.load` asks, naming the stage's `teacher_backends` line)."""
    known = sorted(set(stage.teachers.values()))
    objective, topk, scheduled = stage.objective, stage.topk, stage.teacher_schedule is not None
    for name, b in stage.teacher_backends.items():
        if name not in known:
            return f"{name!r} is no teacher of this stage (its teachers: {known})"
        if isinstance(b, HttpBackend):
            if objective in FULL_DISTRIBUTION:
                return (f"teacher {name!r} is served over HTTP, which returns at most top-{b.max_logprobs} logprobs "
                        f"per position (vLLM's prompt_logprobs), not the full distribution that objective "
                        f"{objective!r} reads; use objective sampled or topk, or `backend: actor`")
            if objective == "topk" and topk > b.max_logprobs:
                return (f"objective topk with topk {topk} asks teacher {name!r} for more logprobs per position than "
                        f"its server returns (max_logprobs {b.max_logprobs}; vLLM's --max-logprobs)")
            if scheduled:
                return (f"teacher {name!r} is served over HTTP, which serves one checkpoint: a `teacher_schedule` "
                        "needs teachers this process or an actor can load snapshot by snapshot")
    return None


def served_over_http(stage, key: tuple) -> bool:
    """Whether the reference at `key` of `stage` (from `recipe.refs.stage_refs`) is a teacher its server scores:
    its weights are never loaded here, so the loader does not ask the Hub for them."""
    backends = getattr(stage, "teacher_backends", None) or {}
    return key[:1] == ("teachers",) and isinstance(backends.get(stage.teachers.get(key[1])), HttpBackend)


def missing_extra(backends: dict[str, ActorBackend | HttpBackend]) -> str | None:
    """Why the teachers' backends cannot run in this environment (an extra not installed, or one that does not
    import), in words; None when they can. Asked at load, so a recipe whose MOPD stage comes after hours of other
    stages fails first, and `mopd validate` says so."""
    actors = sorted(n for n, b in backends.items() if isinstance(b, ActorBackend))
    if actors and (why := import_problem("ray")):
        return f"teacher {actors[0]!r} has `backend: actor`, which needs Ray ({why}): pip install 'mopd[ray]'"
    return None
