"""The base of every recipe model: one definition of what "strict" means, for every schema module."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Unknown keys are errors; numbers are finite (`lr: .inf` is refused); `true` is not the integer 1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
