"""Errors a user sees as one line (the CLI prints str(error) and exits 2)."""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe mistake; str() is the one line the CLI prints: file, line, key and what is wrong."""


class StageError(RuntimeError):
    """A stage that cannot go on (a non-finite loss, gradient or weight); str() is one line naming the stage, the
    step and the metric, and nothing non-finite has been saved."""
