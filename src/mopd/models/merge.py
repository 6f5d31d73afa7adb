"""Parameter merging: a merged model is arithmetic on the teachers' state dicts, no training.

    average:          theta = (1/N) sum_i theta_i
    task_arithmetic:  theta = theta_base + lam * sum_i (theta_i - theta_base)    (Ilharco et al., ICLR 2023)

The MOPD paper (arXiv 2606.30406) reports both as baselines for merging domain teachers. Why both: averaging
dilutes each teacher's task vector by 1/N, while task arithmetic keeps (lam = 1) or rescales it, at the cost of
interference where the vectors overlap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

MergeMethod = Literal["average", "task_arithmetic"]


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    method: MergeMethod,
    lam: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Merge `models` (same keys and shapes as `base`) by `method`.

    Floating-point tensors are merged in float64 and cast back to their dtype; other tensors (integer buffers)
    are taken from `base`, since averaging an index or a counter has no meaning.

    Args:
        base: the state dict the models were fine-tuned from (task arithmetic's origin).
        models: the state dicts to merge, at least one.
        method: "average" or "task_arithmetic".
        lam: scale of the summed task vectors (task_arithmetic only).

    Returns:
        the merged state dict (new tensors).

    Raises:
        ValueError: no models, a key missing, or a shape that differs from the base's (names the key).
    """
    if not models:
        raise ValueError("merge needs at least one model")
    if method not in ("average", "task_arithmetic"):
        raise ValueError(f"unknown merge method {method!r}; expected 'average' or 'task_arithmetic'")
    out: dict[str, torch.Tensor] = {}
    for key, b in base.items():
        for i, m in enumerate(models):
            if key not in m:
                raise ValueError(f"model {i} has no parameter {key!r}")
            if m[key].shape != b.shape:
                raise ValueError(
                    f"model {i} parameter {key!r} has shape {tuple(m[key].shape)}, base has {tuple(b.shape)}"
                )
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        stack = torch.stack([m[key].detach().to(torch.float64) for m in models])
        if method == "average":
            merged = stack.mean(0)
        else:
            b64 = b.detach().to(torch.float64)
            merged = b64 + lam * (stack - b64).sum(0)
        out[key] = merged.to(b.dtype)
    return out
