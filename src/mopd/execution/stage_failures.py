"""What both executors do when a stage fails: its dependants are not run, every other stage runs on, and the run
ends with one StageError line per failed stage naming the stages it kept from running.

Why keep going: a recipe's branches are independent experiments (three teacher pipelines, a comparison's eight
methods); one refused or broken branch should not cost the others' compute, and a rerun then retries only the
failed branch and its dependants (everything finished is skipped by identity).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..core.errors import StageError


def first_line(e: BaseException) -> str:
    """An error as one line: a StageError's own first line, anything else prefixed with its type."""
    text = str(e).strip()
    if isinstance(e, StageError):
        return text.splitlines()[0] if text else type(e).__name__
    line = next((s for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


@dataclass
class StageFailures:
    failed: dict[str, str] = field(default_factory=dict)  # stage -> its error, one line
    stopped: dict[str, str] = field(default_factory=dict)  # stage -> the failed stage it (transitively) needs
    errors: dict[str, BaseException] = field(default_factory=dict, repr=False)

    def blocked(self, name: str, parents: Iterable[str]) -> bool:
        """True (and `name` recorded as not run) if a parent failed or was itself not run."""
        for p in parents:
            cause = p if p in self.failed else self.stopped.get(p)
            if cause is not None:
                self.stopped[name] = cause
                return True
        return False

    def fail(self, name: str, error: BaseException) -> str:
        self.errors[name] = error
        self.failed[name] = first_line(getattr(error, "cause", None) or error)
        return self.failed[name]

    def raise_if_any(self) -> None:
        """One StageError line per failed stage; chained to the first error that is not a StageError (a bug or
        a library's error), so its traceback is there for whoever debugs it."""
        if self.failed:
            cause = next((e for e in self.errors.values() if not isinstance(e, StageError)), None)
            raise StageError("\n".join(self.line(n) for n in self.failed)) from cause

    def line(self, name: str) -> str:
        dependants = [s for s, c in self.stopped.items() if c == name]
        not_run = f"; not run: {', '.join(dependants)}" if dependants else ""
        why = self.failed[name]
        said = why.startswith(f"stage {name!r}")  # the error already names its stage (preflight, domain errors)
        return f"{why if said else f'stage {name!r} failed: {why}'}{not_run}"
