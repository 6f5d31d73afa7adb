"""The one stage scheduler: a stage starts once its parents finished, a failed stage stops its dependants and
every other stage runs on; what actually runs a stage is an `Executor` behind a three-call protocol.

Why a protocol: the local executor (stages one after another in this process) and the Ray executor (a Ray task
per stage) used to be two loops that each decided readiness, failures and recording. Now they only run stages;
the order, the blocked dependants and the run.json records are decided here once, so a third executor (a job
queue, a Kubernetes operator) is a class with `submit`, `wait_any` and `close`, nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from ..recipe.load import LoadedRecipe
from .stage_failures import StageFailures


@dataclass(frozen=True)
class Ended:
    """A submitted stage that ended: its run.json entry, or the error it raised."""

    name: str
    entry: dict | None = None
    error: BaseException | None = None


class Executor(AbstractContextManager, Protocol):
    """What runs stages. Used as a context manager around the whole schedule (its progress display, its
    workers). `submit` starts (or queues) a stage whose parents all finished, with the earlier run's run.json
    entry of that stage (`prior`, same identity only, else {}); `wait_any` blocks until at least one submitted
    stage ended and returns those; `failed` shows a failed stage's one-line reason."""

    def submit(self, name: str, prior: dict) -> None: ...

    def wait_any(self) -> list[Ended]: ...

    def failed(self, name: str, why: str) -> None: ...


def schedule(loaded: LoadedRecipe, executor: Executor, stages_info: dict[str, dict],
             record: Callable[[str, dict], None]) -> None:
    """Run every stage of `loaded` on `executor`, submitting each in the recipe's order once its parents are
    recorded; `record(name, entry)` each stage that finished. A stage whose parent failed (or was not run) is
    never submitted. Ends with one StageError line per failed stage."""
    parents = {n: loaded.facts[n].parents for n in loaded.order}  # external references are not waited for
    failures = StageFailures()
    waiting, running, done = list(loaded.order), set(), set()
    with executor:
        while waiting or running:
            for name in list(waiting):
                if failures.blocked(name, parents[name]):
                    waiting.remove(name)
                elif all(p in done for p in parents[name]):
                    executor.submit(name, stages_info.get(name, {}))
                    running.add(name)
                    waiting.remove(name)
            if not running:
                break
            for ended in executor.wait_any():
                running.discard(ended.name)
                if ended.error is not None:
                    executor.failed(ended.name, failures.fail(ended.name, ended.error))
                    continue
                assert ended.entry is not None
                done.add(ended.name)
                record(ended.name, ended.entry)
    failures.raise_if_any()
