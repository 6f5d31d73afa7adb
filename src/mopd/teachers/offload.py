"""Teacher placement: keep teachers in host memory and bring each to the accelerator only to score its rows.

Why: a MOPD stage holds one frozen teacher per domain. Resident teachers need student + sum(teachers) of
accelerator memory; offloaded ones need student + the largest teacher, at the cost of one host<->device copy of
each routed teacher per step. The same code path runs on CPU, where both moves are no-ops, so tests on CPU
exercise exactly what runs on a GPU (the memory bound itself is untested on GPU; see docs/REAL_MODELS.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def placed_on(model: torch.nn.Module, device: torch.device | None) -> Iterator[torch.nn.Module]:
    """`model` moved to `device` for the duration of the block, then back where it was (None: left in place)."""
    if device is None:
        yield model
        return
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def teachers_fit(teachers: list[torch.nn.Module], device: torch.device, reserve_bytes: int = 0) -> bool:
    """Whether every teacher can stay resident on `device` beside the student (`teacher_device: auto`).

    On CPU there is nothing to save. On CUDA the teachers' parameter bytes plus `reserve_bytes` (the student,
    not loaded yet when the panel is built) must fit in half of the free memory, leaving the other half for
    activations, logits and optimizer state.
    """
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    need = sum(p.numel() * p.element_size() for t in teachers for p in t.parameters())
    return need + reserve_bytes <= free // 2
