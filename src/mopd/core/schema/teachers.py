"""Where a MOPD stage's teachers score: the `teacher_backends:` map of a mopd stage.

Why a separate map keyed by teacher (rather than objects inside `teachers:`): `teachers: {domain: teacher}` keeps
one form in every recipe and every module that reads it (references, identities, lineage, tokenizer checks),
and where a teacher runs is not what the student is trained on, so the map stays out of the stage's identity
(`recipe.identity.SETTINGS_NOT_IN_IDENTITY`). A teacher absent from the map scores in the trainer's process,
as before. A teacher named by several domains is one entry, so they share one actor or one server.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .strict import Strict


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


class HttpBackend(Strict):
    """An OpenAI-compatible server that returns prompt logprobs (vLLM, SGLang, `mopd serve`): sampled-token
    logprobs and top-k come from `/v1/completions` with `prompt_logprobs`; the full distribution does not (a
    server returns at most `max_logprobs` per position), so the full-distribution objectives are refused."""

    backend: Literal["http"]
    url: str = Field(pattern=r"^https?://\S+$", description="the server's OpenAI base URL, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="the served model name; null: the server's only model")
    timeout: float = Field(60.0, gt=0, description="seconds per request before it counts as failed")
    retries: int = Field(2, ge=0, description="retries of a failed request (connection error, timeout, 5xx)")
    max_logprobs: int = Field(20, gt=0, description="the server's limit on logprobs per position (vLLM --max-logprobs)")
    concurrency: int = Field(8, gt=0, description="requests in flight to this server at once")


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
    """Why the teachers' backends cannot run in this environment (an extra not installed), in words; None when
    they can. Asked at load, so a recipe whose MOPD stage comes after hours of other stages fails first."""
    from importlib.util import find_spec

    actors = sorted(n for n, b in backends.items() if isinstance(b, ActorBackend))
    if actors and find_spec("ray") is None:
        return f"teacher {actors[0]!r} has `backend: actor`, which needs Ray: pip install 'mopd[ray]'"
    return None
