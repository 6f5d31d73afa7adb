"""The base of every recipe model: one definition of what "strict" means, for every schema module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class Strict(BaseModel):
    """Unknown keys are errors; numbers are finite (`lr: .inf` is refused); `true` is not the integer 1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def rule_error(model: BaseModel, *key: str | int, message: str) -> ValidationError:
    """A rule over a model's own settings, broken, as an error located at `key` inside the model (not at the model
    as a whole) and worded as `message` alone (without pydantic's "Value error, "): the recipe loader then names
    that key's line in the file, as it does for a type error. Raise it from a model validator: pydantic puts the
    model's own place in the recipe (stages.<name>) in front of `key`."""
    error = PydanticCustomError("recipe_rule", "{message}", {"message": message})
    value = getattr(model, str(key[0]), None) if key else None
    return ValidationError.from_exception_data(type(model).__name__, [
        InitErrorDetails(type=error, loc=tuple(key), input=value),
    ])
